"""Quickstart: DyRep on scikit-learn's bundled digits (offline, a few minutes on a CPU).

A small ResNet-18-for-CIFAR (width 0.25) on 16x16 grayscale digits; DyRep
adjusts the structure every epoch (grow the top synflow slot, calibrate BN,
Dep), then the network is fused into the plain deploy network.
"""

from dyrep_jax.config_base import base_config


def get_config():
    c = base_config()
    c.name = "quickstart_digits"
    c.model.name = "resnet18_cifar"
    c.model.width = 0.25
    c.data.dataset = "digits"
    c.data.augment = "none"
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_epochs = 8
    c.optim.lr = 0.05
    c.optim.weight_decay = 5e-4
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 1
    c.dyrep.max_adjust_epochs = 6
    c.dyrep.calib_batches = 5
    c.log_every_steps = 10
    return c
