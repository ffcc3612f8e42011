"""ImageNet, RepVGG-B2g4, the strong RepVGG recipe: 200 epochs, 5 warmup, RandAugment m9
(mstd 0.5), random erasing 0.2, label smoothing 0.1; grow every 5 until 100.
"""

from dyrep_jax.recipes import imagenet_recipe


def get_config():
    c = imagenet_recipe("imagenet_repvgg_b2g4", "repvgg_b2g4", epochs=200)
    c.data.augment = "imagenet_strong"
    c.optim.warmup_epochs = 5
    c.optim.label_smoothing = 0.1
    return c
