"""Write imported variables as a run directory that training's eval/export modes can resume.

Layout = a training workdir: DIR/checkpoints (orbax; items state, opt, meta)
plus DIR/arch.json. The optimizer state must have the *layout* of the
optimizer the resuming config builds, or orbax refuses to restore it; it is
built with `make_optimizer` from `base_config()` (or from `--config`), fresh
(momentum zero). State `step` is 0: the LR schedule of a resumed run starts
over, while `meta.epoch` keeps the reference file's epoch.
"""

from __future__ import annotations

import importlib.util
import os

import jax

from dyrep_jax import checkpoint as ckpt
from dyrep_jax.config_base import base_config
from dyrep_jax.dyrep import eligible_slots
from dyrep_jax.optim import cosine_schedule, make_optimizer
from dyrep_jax.state import new_train_state
from dyrep_jax.tools.arch import write_arch_file
from dyrep_jax.tools.errors import ToolError


def load_config(path: str | None):
    """`get_config()` of a config file (configs/*.py), or the base config."""
    if path is None:
        return base_config()
    if not os.path.isfile(path):
        raise ToolError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("imported_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ToolError(f"{path} defines no get_config()")
    return module.get_config()


def fresh_opt_state(config, params):
    """`tx.init(params)` for the optimizer `config` trains with (its layout is what matters)."""
    o = config.optim
    tx = make_optimizer(name=o.name, schedule=cosine_schedule(o.lr, 1), momentum=o.momentum,
                        nesterov=o.nesterov, weight_decay=o.weight_decay,
                        decay_bn_and_bias=o.decay_bn_and_bias, grad_clip_norm=o.grad_clip_norm)
    return jax.jit(tx.init)(params)  # one compiled program, not one per leaf shape


def check_empty_target(out_dir: str) -> None:
    """Refuse to mix an import into an existing run (or to write over a file)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ToolError(f"--out {out_dir} exists and is not a directory")
    checkpoints = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise ToolError(f"{checkpoints} already holds checkpoints; choose a new --out directory")


def write_run(out_dir: str, variables: dict, arch: dict, epoch: int, name: str,
              config=None) -> str:
    """Save `variables` as step 0 of a run in `out_dir`; returns the checkpoints path."""
    check_empty_target(out_dir)
    config = base_config() if config is None else config
    params = variables["params"]
    state = new_train_state(variables, fresh_opt_state(config, params),
                            num_scores=len(eligible_slots(params)))
    meta = ckpt.run_meta(epoch=epoch, step_in_epoch=0, best_test_top1=-1.0, name=name,
                         model=arch["model"], params=params)
    checkpoints = os.path.join(os.path.abspath(out_dir), "checkpoints")
    manager = ckpt.make_manager(checkpoints, async_save=False)
    ckpt.save(manager, state, meta, None)
    manager.wait_until_finished()
    manager.close()
    write_arch_file(out_dir, arch)
    return checkpoints
