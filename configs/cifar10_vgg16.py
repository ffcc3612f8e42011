"""CIFAR-10, VGG-16, the DyRep reference CIFAR recipe (600 epochs; target 95.22% top-1).

Data: TFDS `cifar10` (offline: --config.data.dataset=npz:PATH). Recipe: dyrep_jax/recipes.py.
"""

from dyrep_jax.recipes import cifar_recipe


def get_config():
    return cifar_recipe("cifar10_vgg16", "vgg16_cifar", "cifar10")
