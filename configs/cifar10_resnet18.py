"""CIFAR-10, ResNet-18 (CIFAR stem), the reference CIFAR recipe (no published DyRep figure).

Data: TFDS `cifar10` (prepared offline: set data.dataset=npz:PATH for local arrays).
Recipe: SGD momentum 0.9 (no Nesterov), lr 0.1 cosine per step to 1e-6, no warmup,
weight decay 1e-4 on everything, batch 128, crop+flip+cutout 16; grow every 15 epochs
until epoch 500 (synflow, top-1), Dep on.
"""

from dyrep_jax.config_base import base_config


def get_config():
    c = base_config()
    c.name = "cifar10_resnet18"
    c.model.name = "resnet18_cifar"
    c.model.dtype = "bfloat16"
    c.data.dataset = "cifar10"
    c.data.augment = "cifar"
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 600
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 1e-4
    c.optim.decay_bn_and_bias = True
    c.optim.min_lr = 1e-6
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 15
    c.dyrep.max_adjust_epochs = 500
    c.log_every_steps = 100
    return c
