"""A tiny end-to-end config: seconds per epoch on a CPU."""

from dyrep_jax.config_base import base_config


def tiny_config(**overrides):
    c = base_config()
    c.name = "tiny"
    c.model.name = "resnet18_cifar"
    c.model.width = 0.125
    c.data.dataset = "synthetic:8,8,3,4,64,32"
    c.data.augment = "cifar"
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_epochs = 2
    c.optim.lr = 0.05
    c.dyrep.mode = "dyrep"
    c.dyrep.adjust_interval = 1
    c.dyrep.max_adjust_epochs = 10
    c.dyrep.calib_batches = 2
    c.checkpoint.async_save = False
    c.log_every_steps = 1
    c.num_devices = 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def write_config_file(path, **overrides) -> str:
    """A config file for `python -m dyrep_jax.main --config` holding `tiny_config(**overrides)`."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {tests!r})\n"
                "from train_helpers import tiny_config\n\n\n"
                f"def get_config():\n    return tiny_config(**{overrides!r})\n")
    return str(path)
