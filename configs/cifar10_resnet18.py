"""CIFAR-10, ResNet-18 (CIFAR stem), the reference CIFAR recipe (no published DyRep figure).
"""

from dyrep_jax.recipes import cifar_recipe


def get_config():
    return cifar_recipe("cifar10_resnet18", "resnet18_cifar", "cifar10")
