"""ImageNet, MobileNetV1 (width 1.0), the reference recipe: 90 epochs, wd 4e-5, grow every 5 until 70.

No published DyRep figure is given in our reference notes for this model.
"""

from dyrep_jax.config_base import base_config


def get_config():
    c = base_config()
    c.name = "imagenet_mobilenet_v1"
    c.model.name = "mobilenet_v1"
    c.model.dtype = "bfloat16"
    c.data.dataset = "imagenet2012"
    c.data.augment = "imagenet"
    c.data.image_size = 224
    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = 90
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = 4e-5
    c.optim.decay_bn_and_bias = False
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 5
    c.dyrep.max_adjust_epochs = 70
    c.log_every_steps = 200
    return c
