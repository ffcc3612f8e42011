"""ImageNet, ResNet-50, the reference ImageNet recipe (120 epochs; target 77.08% top-1)."""

from dyrep_jax.config_base import base_config


def get_config():
    c = base_config()
    c.name = "imagenet_resnet50"
    c.model.name = "resnet50"
    c.model.dtype = "bfloat16"
    c.data.dataset = "imagenet2012"
    c.data.augment = "imagenet"
    c.data.image_size = 224
    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = 120
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.optim.decay_bn_and_bias = False
    c.optim.min_lr = 1e-7
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 5
    c.dyrep.max_adjust_epochs = 100
    c.log_every_steps = 200
    return c
