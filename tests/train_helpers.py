"""A tiny end-to-end config: seconds per epoch on a CPU."""

import contextlib
from unittest import mock

from dyrep_jax.config_base import base_config
from dyrep_jax.rep.tree import structure_of


def tiny_config(**overrides):
    c = base_config()
    c.name = "tiny"
    c.model.name = "resnet18_cifar"
    c.model.width = 0.125
    c.data.dataset = "synthetic:8,8,3,4,64,32"
    c.data.augment = "none"  # cifar (cutout 16 px) would blank 8x8 images entirely
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


@contextlib.contextmanager
def branchwise_slots():
    """Run every model slot through the branch-by-branch reference `apply_slot_branchwise`,
    so a training network's inference output is computed without the fused fast path.
    Yields a list that counts the block slots it ran."""
    from dyrep_jax.rep import module
    from dyrep_jax.rep.apply import apply_slot_branchwise, is_block

    blocks = []

    def reference(params, stats, x, geom, train, *args, share_1x1=True, fuse_inference=True,
                  **kwargs):
        del share_1x1, fuse_inference  # the reference computes every branch on its own
        if is_block(params):
            blocks.append(geom)
        return apply_slot_branchwise(params, stats, x, geom, train, *args, **kwargs)

    with mock.patch.object(module, "apply_slot", reference):
        yield blocks


def branchwise_logits(model, variables, images):
    """Inference-mode logits with every grown slot computed branch by branch."""
    with branchwise_slots() as blocks:
        logits = model.apply(variables, images, train=False)
    grown = bool(structure_of(variables["params"]))
    assert bool(blocks) == grown, "the branchwise reference did not run the grown slots"
    return logits


def write_config_file(path, **overrides) -> str:
    """A config file for `python -m dyrep_jax.main --config` holding `tiny_config(**overrides)`."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {tests!r})\n"
                "from train_helpers import tiny_config\n\n\n"
                f"def get_config():\n    return tiny_config(**{overrides!r})\n")
    return str(path)
