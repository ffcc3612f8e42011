"""orbax checkpoints: the train state *is* the architecture, so no template is needed.

A checkpoint holds three items:
- `state`: params, batch_stats, controller scores (restored without a target:
  the saved pytree's structure is the network's structure),
- `opt`: the optax state (restored against `tx.init(params)` of the restored
  params, since optax states are NamedTuples),
- `meta`: JSON with step, epoch, data position, best accuracy, config name.
We keep the latest N and the best (by test top-1). A latest checkpoint that
cannot be read falls back to the previous one with a warning.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger("dyrep_jax")


class CheckpointError(RuntimeError):
    pass


def make_manager(directory: str, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True) -> ocp.CheckpointManager:
    policies = [ocm.LatestN(n=keep)]
    if keep_best:
        policies.append(ocm.BestN(get_metric_fn=lambda m: m["test_top1"], n=1,
                                  keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "opt", "meta"))


def save(manager, step: int, state: dict, opt_state, meta: dict, test_top1: float | None):
    metrics = None if test_top1 is None else {"test_top1": float(test_top1)}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            opt=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
    )


def _as_host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def restore_latest(manager, make_opt_template):
    """(step, state, opt_state, meta) of the newest readable checkpoint, or None.

    `make_opt_template(params)` returns `tx.init(params)`.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            state = _as_host(restored["state"])
            template = make_opt_template(state["params"])
            opt = manager.restore(step, args=ocp.args.Composite(
                opt=ocp.args.StandardRestore(_as_host(template))))["opt"]
            if errors:
                log.warning("checkpoint(s) %s unreadable, resumed from step %d instead",
                            ", ".join(str(s) for s, _ in errors), step)
            return step, state, opt, dict(restored["meta"])
        except Exception as exc:  # noqa: BLE001 - any read failure means "try the previous one"
            log.warning("checkpoint at step %d could not be restored (%s: %s); trying the "
                        "previous one", step, type(exc).__name__, str(exc).splitlines()[0][:200])
            errors.append((step, exc))
    if errors:
        raise CheckpointError(
            f"no readable checkpoint in {manager.directory}: tried steps "
            f"{[s for s, _ in errors]}; last error: {errors[-1][1]}. Move the directory away "
            "to start fresh."
        )
    return None


def save_fused(directory: str, fused_variables: dict, arch: dict, write_arch: bool = True):
    """Deploy parameters (orbax) plus `arch.json` describing how to rebuild the model."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    target = os.path.join(directory, "params")
    ckptr.save(target, _as_host(fused_variables), force=True)
    ckptr.wait_until_finished()
    if write_arch:
        with open(os.path.join(directory, "arch.json"), "w") as f:
            json.dump(arch, f, indent=2)


def load_fused(directory: str):
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, "arch.json")) as f:
        arch = json.load(f)
    variables = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
    return _as_host(variables), arch
