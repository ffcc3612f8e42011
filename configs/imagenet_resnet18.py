"""ImageNet, ResNet-18, the reference ImageNet recipe (120 epochs; target 71.58% top-1).

Needs TFDS `imagenet2012` prepared (TFDS_DATA_DIR). Recipe: dyrep_jax/recipes.py.
"""

from dyrep_jax.recipes import imagenet_recipe


def get_config():
    return imagenet_recipe("imagenet_resnet18", "resnet18")
