"""ImageNet, RepVGG-B2g4, the strong RepVGG recipe: 200 epochs, 5 warmup epochs from 1e-6
(stepped per epoch), RandAugment m9 (mstd 0.5), random erasing 0.2, label smoothing 0.1,
BN recalibrated every epoch; grow every 5 until 100. Recipe: dyrep_jax/recipes.py.
"""

from dyrep_jax.recipes import repvgg_recipe


def get_config():
    return repvgg_recipe("imagenet_repvgg_b2g4", "repvgg_b2g4", strong=True)
