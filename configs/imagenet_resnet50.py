"""ImageNet, ResNet-50, the reference ImageNet recipe (120 epochs; target 77.08% top-1).
"""

from dyrep_jax.recipes import imagenet_recipe


def get_config():
    return imagenet_recipe("imagenet_resnet50", "resnet50")
