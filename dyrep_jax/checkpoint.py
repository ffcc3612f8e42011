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
read falls back to the previous one with a warning (`restore`); a resuming
run moves the unreadable one to DIR/checkpoints/broken/<step> (never deleted).
A save that fails (now or in the background) raises CheckpointError at once.
The meta also holds the run's identity and settings (`identity.py`), checked
before a checkpoint is resumed, evaluated or exported.

`arch.json` (next to a fused export, or a run written by `tools.import_torch`)
describes how to rebuild the model: the fields of `arch_record`.

Older layouts: runs written before `state.py` (commit 67bf3a2 and earlier)
have the same items; `state.from_checkpoint` fills what they may lack, and
`tools.arch.with_bn_layout` infers `with_bn_after_3x3` for their arch.json.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from dyrep_jax.errors import CheckpointError, NoCheckpointError
from dyrep_jax.paths import as_path
from dyrep_jax.rep.tree import structure_of
from dyrep_jax.state import TrainState, from_checkpoint, to_checkpoint

log = logging.getLogger("dyrep_jax")

ARCH_FILE = "arch.json"
ITEMS = ("state", "opt", "meta")


__all__ = ["CheckpointError", "NoCheckpointError", "Restored", "make_manager", "restore",
           "restore_dir", "run_meta", "save"]
BROKEN_DIR = "broken"  # unreadable steps are moved to DIR/checkpoints/broken/<step>
SAVE_WAIT_S = 600.0  # a save still running after this long is reported as failed


class Restored(NamedTuple):
    step: int
    state: TrainState  # opt_state is None when the optimizer was not read
    meta: dict


def make_manager(directory, keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, create: bool = True) -> ocp.CheckpointManager:
    policies = [ocm.LatestN(n=keep)]
    if keep_best:
        policies.append(ocm.BestN(get_metric_fn=lambda m: m["test_top1"], n=1,
                                  keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=create,
    )
    return ocp.CheckpointManager(as_path(directory), options=options, item_names=ITEMS)


def run_meta(*, epoch: int, step_in_epoch: int, best_test_top1: float, name: str, model: str,
             params, **extra) -> dict:
    """The `meta` item: where the data stream resumes, and what the run is.

    `extra` (from the Trainer): `identity` and `settings` (`identity.py`), `run_id`
    (the workdir lock's), `partial` (train sums of an epoch stopped midway).
    """
    return {"epoch": int(epoch), "step_in_epoch": int(step_in_epoch),
            "best_test_top1": float(best_test_top1), "name": name, "model": model,
            "structure": structure_of(params), **extra}


def save(manager, state: TrainState, meta: dict, test_top1: float | None):
    """Save a host-side state as checkpoint `state['step']`; `test_top1` ranks "best".

    Raises CheckpointError at once when this save, or an earlier background
    one, failed: training must not go on without its checkpoints.
    """
    check_saves(manager)
    item, opt_state = to_checkpoint(state)
    metrics = None if test_top1 is None else {"test_top1": float(test_top1)}
    step = int(state["step"])
    try:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(item), opt=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
    except Exception as exc:  # noqa: BLE001 - any failure to write is fatal for the run
        raise save_failed(manager, exc, step) from exc


def save_failed(manager, exc: BaseException, step=None) -> CheckpointError:
    what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    return CheckpointError(
        f"saving {what} in {manager.directory} failed ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); training stopped. Earlier "
        "checkpoints are kept: fix the cause (disk space, path, permissions) and rerun the "
        "same command to resume from the last one.")


def check_saves(manager) -> None:
    """CheckpointError if a background save has failed (cheap: call it every step)."""
    try:
        manager.check_for_errors()
        if not manager.is_saving_in_progress():
            manager.wait_until_finished()  # returns at once, or raises the save's error
    except Exception as exc:  # noqa: BLE001
        raise save_failed(manager, exc) from exc


def wait_for_saves(manager, timeout_s: float = SAVE_WAIT_S, raise_errors: bool = True) -> None:
    """Wait for background saves, at most `timeout_s`; a failure becomes CheckpointError.

    With `raise_errors=False` (the run is failing already) a failure is only logged.
    """
    outcome = {}

    def wait():
        try:
            manager.wait_until_finished()
            manager.check_for_errors()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            outcome["error"] = exc

    waiter = threading.Thread(target=wait, name="dyrep-wait-for-saves", daemon=True)
    waiter.start()
    waiter.join(timeout_s)
    error = outcome.get("error")
    if waiter.is_alive():
        error = TimeoutError(f"background save still running after {timeout_s:.0f}s")
    if error is None:
        return
    if raise_errors:
        raise save_failed(manager, error) from error
    log.error("%s", save_failed(manager, error))


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


def restore(manager, make_opt_template=None, move_broken: bool = False) -> Restored | None:
    """The newest readable checkpoint, or None when there is none.

    `make_opt_template(params)` returns `tx.init(params)`; without it the
    optimizer state is not read. Unreadable checkpoints are skipped with a
    warning; with `move_broken` (a resuming run; every process must pass it)
    the primary process moves them to DIR/broken/<step>, so that the retrained
    step can be saved again. If none can be read, CheckpointError says what to do.
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
        break
    else:
        found = None
    if move_broken and errors:
        if jax.process_index() == 0:
            for step, _ in errors:
                log.warning("unreadable checkpoint of step %d moved to %s (kept for inspection)",
                            step, move_broken_step(manager.directory, step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dyrep_jax: broken checkpoints moved")
        manager.reload()
    if found is None and errors:
        raise CheckpointError(
            f"no readable checkpoint in {manager.directory}: tried steps "
            f"{[s for s, _ in errors]}; last error: {errors[-1][1]}. Move the directory away "
            "to start fresh.")
    return found


def move_broken_step(directory, step: int) -> epath.Path:
    """Move DIR/<step> to DIR/broken/<step> (never deleted; `.N` added if taken)."""
    source = epath.Path(directory) / str(step)
    broken = epath.Path(directory) / BROKEN_DIR
    broken.mkdir(parents=True, exist_ok=True)
    target, n = broken / str(step), 1
    while target.exists():
        target, n = broken / f"{step}.{n}", n + 1
    source.rename(target)
    return target


def restore_dir(checkpoint_dir, make_opt_template=None) -> Restored | None:
    """`restore` of the checkpoints in a directory (read only: nothing is created)."""
    path = as_path(checkpoint_dir)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a checkpoints directory")
    if not path.is_dir():
        return None
    manager = make_manager(path, async_save=False, create=False)
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


def write_arch(directory, arch: dict) -> epath.Path:
    path = as_path(directory) / ARCH_FILE
    path.write_text(json.dumps(arch, indent=2))
    return path


def read_arch(directory) -> dict | None:
    """DIR/arch.json, or None if absent; ValueError when it is not an arch."""
    path = as_path(directory) / ARCH_FILE
    if not path.is_file():
        return None
    try:
        arch = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(arch, dict) or "model" not in arch:
        raise ValueError(f"{path}: expected a JSON object with at least a 'model' field")
    return arch


def save_fused(directory, fused_variables: dict, arch: dict, write_arch_file: bool = True):
    """Deploy parameters (orbax, DIR/params) plus DIR/arch.json."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory / "params", _as_host(fused_variables), force=True)
    ckptr.wait_until_finished()
    if write_arch_file:
        write_arch(directory, arch)


def load_fused(directory):
    """(fused variables, arch) of a fused export."""
    directory = as_path(directory)
    arch = read_arch(directory)
    if arch is None:
        raise FileNotFoundError(f"no {ARCH_FILE} in {directory}")
    variables = ocp.StandardCheckpointer().restore(directory / "params")
    return _as_host(variables), arch
