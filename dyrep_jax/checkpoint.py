"""The on-disk schema of a run: orbax checkpoints of the train state, and `arch.json`.

A checkpoint (one directory per step under DIR/checkpoints) holds three items:
- `state`: `state.to_checkpoint`'s first item (params, batch_stats, scores,
  score_steps, step), restored without a template: the saved pytree's
  structure is the network's structure;
- `opt`: the optax state, restored against `tx.init(params)` of the restored
  params (optax states are NamedTuples, which need a template);
- `meta`: JSON, the fields of `run_meta` (data position, best accuracy, names,
  structure summary).
We keep the latest N and the best by test top-1. A checkpoint that cannot be
read falls back to the previous one with a warning (`restore`).

`arch.json` (next to a fused export, or a run written by `tools.import_torch`)
describes how to rebuild the model: the fields of `arch_record`.

Older layouts: runs written before `state.py` (commit 67bf3a2 and earlier)
have the same items; `state.from_checkpoint` fills what they may lack, and
`tools.arch.with_bn_layout` infers `with_bn_after_3x3` for their arch.json.
"""

from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from dyrep_jax.rep.tree import structure_of
from dyrep_jax.state import TrainState, from_checkpoint, to_checkpoint

log = logging.getLogger("dyrep_jax")

ARCH_FILE = "arch.json"
ITEMS = ("state", "opt", "meta")


class CheckpointError(RuntimeError):
    pass


class Restored(NamedTuple):
    step: int
    state: TrainState  # opt_state is None when the optimizer was not read
    meta: dict


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
    return ocp.CheckpointManager(_path(directory), options=options, item_names=ITEMS)


def run_meta(*, epoch: int, step_in_epoch: int, best_test_top1: float, name: str, model: str,
             params) -> dict:
    """The `meta` item: where the data stream resumes, and what the run is."""
    return {"epoch": int(epoch), "step_in_epoch": int(step_in_epoch),
            "best_test_top1": float(best_test_top1), "name": name, "model": model,
            "structure": structure_of(params)}


def save(manager, state: TrainState, meta: dict, test_top1: float | None):
    """Save a host-side state as checkpoint `state['step']`; `test_top1` ranks "best"."""
    item, opt_state = to_checkpoint(state)
    metrics = None if test_top1 is None else {"test_top1": float(test_top1)}
    manager.save(
        int(state["step"]),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(item),
            opt=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
    )


def _as_host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def restore_step(manager, step: int, make_opt_template=None) -> Restored:
    """Checkpoint `step` (raises if it cannot be read); see `restore` for the template."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    item = _as_host(dict(restored["state"]))
    opt = None
    if make_opt_template is not None:
        template = _as_host(make_opt_template(item["params"]))
        opt = manager.restore(step, args=ocp.args.Composite(
            opt=ocp.args.StandardRestore(template)))["opt"]
    return Restored(step, from_checkpoint(item, opt), dict(restored["meta"] or {}))


def restore(manager, make_opt_template=None) -> Restored | None:
    """The newest readable checkpoint, or None when there is none.

    `make_opt_template(params)` returns `tx.init(params)`; without it the
    optimizer state is not read. Unreadable checkpoints are skipped with a
    warning; if none can be read, CheckpointError says what to do.
    """
    errors = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            found = restore_step(manager, step, make_opt_template)
        except Exception as exc:  # noqa: BLE001 - any read failure means "try the previous one"
            log.warning("checkpoint at step %d could not be restored (%s: %s); trying the "
                        "previous one", step, type(exc).__name__, str(exc).splitlines()[0][:200])
            errors.append((step, exc))
            continue
        if errors:
            log.warning("checkpoint(s) %s unreadable, resumed from step %d instead",
                        ", ".join(str(s) for s, _ in errors), step)
        return found
    if errors:
        raise CheckpointError(
            f"no readable checkpoint in {manager.directory}: tried steps "
            f"{[s for s, _ in errors]}; last error: {errors[-1][1]}. Move the directory away "
            "to start fresh.")
    return None


def restore_dir(checkpoint_dir: str, make_opt_template=None) -> Restored | None:
    """`restore` of the checkpoints in a directory (read only: nothing is created)."""
    if not _path(checkpoint_dir).exists():
        return None
    manager = make_manager(checkpoint_dir, async_save=False)
    try:
        return restore(manager, make_opt_template)
    finally:
        manager.close()


# ----------------------------------------------------------------------------- arch.json


def arch_record(*, model: str, num_classes: int, width: float, dtype: str, image_shape,
                with_bn_after_3x3: bool, mean=None, std=None, **extra) -> dict:
    """Every field of `arch.json`; `extra` adds run facts (params, macs, test_top1, name...)."""
    arch = {"model": model, "num_classes": int(num_classes), "width": float(width),
            "dtype": dtype, "image_shape": [int(v) for v in image_shape],
            "with_bn_after_3x3": bool(with_bn_after_3x3)}
    if mean is not None:
        arch["mean"] = [float(v) for v in np.asarray(mean).reshape(-1)]
        arch["std"] = [float(v) for v in np.asarray(std).reshape(-1)]
    return {**arch, **extra}


def _path(directory) -> epath.Path:
    """Local paths made absolute; `gs://...` (any epath scheme) kept as is."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def write_arch(directory: str, arch: dict) -> str:
    path = _path(directory) / ARCH_FILE
    path.write_text(json.dumps(arch, indent=2))
    return str(path)


def read_arch(directory: str) -> dict | None:
    """DIR/arch.json, or None if absent; ValueError when it is not an arch."""
    path = _path(directory) / ARCH_FILE
    if not path.exists():
        return None
    try:
        arch = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(arch, dict) or "model" not in arch:
        raise ValueError(f"{path}: expected a JSON object with at least a 'model' field")
    return arch


def save_fused(directory: str, fused_variables: dict, arch: dict, write_arch_file: bool = True):
    """Deploy parameters (orbax, DIR/params) plus DIR/arch.json."""
    directory = _path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory / "params", _as_host(fused_variables), force=True)
    ckptr.wait_until_finished()
    if write_arch_file:
        write_arch(directory, arch)


def load_fused(directory: str):
    """(fused variables, arch) of a fused export."""
    directory = _path(directory)
    arch = read_arch(directory)
    if arch is None:
        raise FileNotFoundError(f"no {ARCH_FILE} in {directory}")
    variables = ocp.StandardCheckpointer().restore(directory / "params")
    return _as_host(variables), arch
