"""CIFAR-100, VGG-16, the DyRep reference CIFAR recipe (600 epochs; target 74.37% top-1).
"""

from dyrep_jax.recipes import cifar_recipe


def get_config():
    return cifar_recipe("cifar100_vgg16", "vgg16_cifar", "cifar100")
