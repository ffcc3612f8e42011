"""--mode=eval and --mode=export: work on the latest checkpoint of a run.

Both restore params and BN statistics only (no optimizer, no training
batches): an `Experiment` is the config, the models and the test split.
"""

from __future__ import annotations

import logging

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import models
from dyrep_jax.errors import NoCheckpointError
from dyrep_jax.experiment import Experiment, evaluate_fused_export, fused_only_dir
from dyrep_jax.state import variables_of
from dyrep_jax.workdir_lock import lock_workdir

log = logging.getLogger("dyrep_jax")


def _restored(config, workdir):
    exp = Experiment(config, workdir)
    checkpoints = exp.workdir / "checkpoints"
    found = ckpt.restore_dir(checkpoints)
    if found is None:
        raise NoCheckpointError(
            f"no checkpoint in {checkpoints}; train first (same command with --mode=train)")
    exp.check_checkpoint(found.meta, resuming=False)
    return exp, variables_of(found.state), found.meta


def evaluate_latest(config, workdir) -> dict:
    """Test accuracy of the latest checkpoint, unfused and fused (or of a fused/ export alone)."""
    fused_dir = fused_only_dir(workdir)
    if fused_dir is not None:
        return evaluate_fused_export(config, fused_dir)
    exp, variables, meta = _restored(config, workdir)
    loss, top1 = exp.evaluate(exp.model, exp.place.replicate(variables), "eval")
    fused = models.fuse_network(variables)
    f_loss, f_top1 = exp.evaluate(exp.deploy_model, exp.place.replicate(fused), "eval_fused")
    log.info("epoch %d checkpoint: test top1 %.4f (loss %.4f); fused top1 %.4f (loss %.4f)",
             meta["epoch"], top1, loss, f_top1, f_loss)
    return {"epoch": meta["epoch"], "test_top1": top1, "test_loss": loss,
            "fused_test_top1": f_top1, "fused_test_loss": f_loss}


def export_latest(config, workdir) -> dict:
    """Fuse the latest checkpoint and write DIR/fused/ (orbax params + arch.json)."""
    exp, variables, meta = _restored(config, workdir)  # checked before the lock creates files
    with lock_workdir(exp.workdir):
        out = exp.export_fused(variables, epoch=meta["epoch"])
    return {"fused_dir": out["fused_dir"], "params": out["fused_params"],
            "macs": out["fused_macs"], "fused_test_top1": out["fused_test_top1"]}
