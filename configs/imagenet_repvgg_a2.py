"""ImageNet, RepVGG-A2, the RepVGG baseline recipe: 120 epochs, RRC + flip (no jitter),
BN recalibrated every epoch, grow every 5 until 100.

Each block is timm's RepVggBlock (kxk conv-BN + 1x1 conv-BN + identity BN); only its kxk
conv is a DyRep target. Recipe: dyrep_jax/recipes.py.
"""

from dyrep_jax.recipes import repvgg_recipe


def get_config():
    return repvgg_recipe("imagenet_repvgg_a2", "repvgg_a2", strong=False)
