"""The reference training recipes, written once; configs/ files pick one and name the model.

Values as the DyRep reference's strategy files (see the recipe table in
shared/design/dyrep-reference.md): CIFAR (600 epochs, batch 128, lr 0.1 cosine
to 1e-6, wd 1e-4 on everything, no Nesterov, crop+flip+cutout, grow every 15
until 500) and ImageNet (batch 256 as 8 GPUs x 32, so BN statistics over
groups of 32 images; Nesterov, lr 0.1 cosine to 1e-7, wd not on BN/bias,
random-resized-crop 224, grow every 5 epochs). The reference trains in
float32; bfloat16 is a speed option (`--config.model.dtype=bfloat16`).
"""

from __future__ import annotations

from dyrep_jax.config_base import base_config

IMAGENET_BN_GROUP = 32  # images per GPU in the reference's 8-GPU ImageNet runs (per-GPU BN)


def cifar_recipe(name: str, model: str, dataset: str):
    c = base_config()
    c.name = name
    c.model.name = model
    c.model.dtype = "float32"
    c.model.bn_group_size = 0  # one GPU saw the whole batch of 128
    c.data.dataset = dataset
    c.data.augment = "cifar"
    c.data.color_jitter = 0.0
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
                    max_adjust_epochs: int = 100, color_jitter: float = 0.06):
    """ResNet / MobileNetV1 recipe (color jitter 0.06); RepVGG recipes start from it."""
    c = base_config()
    c.name = name
    c.model.name = model
    c.model.dtype = "float32"
    c.model.bn_group_size = IMAGENET_BN_GROUP
    c.data.dataset = "imagenet2012"
    c.data.augment = "imagenet"
    c.data.image_size = 224
    c.data.color_jitter = color_jitter
    c.batch_size = 256
    c.eval_batch_size = 500
    c.num_epochs = epochs
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = weight_decay
    c.optim.decay_bn_and_bias = False
    c.optim.min_lr = 1e-7
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 5
    c.dyrep.max_adjust_epochs = max_adjust_epochs
    c.log_every_steps = 200
    return c


def repvgg_recipe(name: str, model: str, *, strong: bool):
    """RepVGG: no color jitter, BN recalibrated every epoch (the authors' README runs).

    `strong` (RepVGG-B2g4): 200 epochs, 5 warmup epochs from 1e-6 stepped per
    epoch, RandAugment rand-m9-mstd0.5, random erasing 0.2, label smoothing 0.1.
    """
    c = imagenet_recipe(name, model, epochs=200 if strong else 120, color_jitter=0.0)
    c.dyrep.recal_bn_every_epoch = True
    if strong:
        c.data.augment = "imagenet_strong"
        c.data.random_erasing = 0.2
        c.optim.warmup_epochs = 5.0
        c.optim.warmup_lr = 1e-6
        c.optim.warmup_by_epoch = True
        c.optim.label_smoothing = 0.1
    return c
