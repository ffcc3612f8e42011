"""ImageNet, RepVGG-A2, the RepVGG baseline recipe: 120 epochs, RRC + flip, grow every 5 until 100.

RepVGG slots start in training form (kxk + 1x1 + id); DyRep grows and prunes from there.
"""

from dyrep_jax.recipes import imagenet_recipe


def get_config():
    return imagenet_recipe("imagenet_repvgg_a2", "repvgg_a2")
