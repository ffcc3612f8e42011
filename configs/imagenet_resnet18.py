"""ImageNet, ResNet-18, the DyRep reference ImageNet recipe (120 epochs; target 71.58% top-1).

Recipe: batch 256 (8 GPUs x 32), SGD Nesterov momentum 0.9, lr 0.1 cosine to 1e-7, weight
decay 1e-4 not on BN/bias, random-resized-crop 224 + flip + color jitter 0.06; grow every
5 epochs until epoch 100. Needs TFDS `imagenet2012` prepared (TFDS_DATA_DIR).
"""

from dyrep_jax.config_base import base_config


def get_config():
    c = base_config()
    c.name = "imagenet_resnet18"
    c.model.name = "resnet18"
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
