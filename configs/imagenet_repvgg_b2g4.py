"""ImageNet, RepVGG-B2g4, the strong RepVGG recipe: 200 epochs, 5 warmup, RandAugment m9
(mstd 0.5), random erasing 0.2, label smoothing 0.1; grow every 5 until 100.
"""

from dyrep_jax.config_base import base_config


def get_config():
    c = base_config()
    c.name = "imagenet_repvgg_b2g4"
    c.model.name = "repvgg_b2g4"
    c.model.dtype = "bfloat16"
    c.data.dataset = "imagenet2012"
    c.data.augment = "imagenet_strong"
    c.data.image_size = 224
    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = 200
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.optim.decay_bn_and_bias = False
    c.optim.warmup_epochs = 5
    c.optim.label_smoothing = 0.1
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 5
    c.dyrep.max_adjust_epochs = 100
    c.log_every_steps = 200
    return c
