"""ImageNet, MobileNetV1 (width 1.0): 90 epochs, wd 4e-5, grow every 5 until 70.
"""

from dyrep_jax.recipes import imagenet_recipe


def get_config():
    return imagenet_recipe("imagenet_mobilenet_v1", "mobilenet_v1", epochs=90, weight_decay=4e-5,
                           max_adjust_epochs=70)
