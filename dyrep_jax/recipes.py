"""The reference training recipes, written once; configs/ files pick one and name the model.

Facts from the DyRep reference notes: CIFAR (600 epochs, batch 128, lr 0.1 cosine to 1e-6,
wd 1e-4 on everything, no Nesterov, crop+flip+cutout, grow every 15 until 500) and ImageNet
(batch 256, Nesterov, lr 0.1 cosine, wd not on BN/bias, random-resized-crop 224, grow every
5 epochs).
"""

from __future__ import annotations

from dyrep_jax.config_base import base_config


def cifar_recipe(name: str, model: str, dataset: str):
    c = base_config()
    c.name = name
    c.model.name = model
    c.model.dtype = "bfloat16"
    c.data.dataset = dataset
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


def imagenet_recipe(name: str, model: str, *, epochs: int = 120, weight_decay: float = 1e-4,
                    max_adjust_epochs: int = 100, min_lr: float = 0.0):
    c = base_config()
    c.name = name
    c.model.name = model
    c.model.dtype = "bfloat16"
    c.data.dataset = "imagenet2012"
    c.data.augment = "imagenet"
    c.data.image_size = 224
    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = epochs
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = weight_decay
    c.optim.decay_bn_and_bias = False
    c.optim.min_lr = min_lr
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 5
    c.dyrep.max_adjust_epochs = max_adjust_epochs
    c.log_every_steps = 200
    return c
