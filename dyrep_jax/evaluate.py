"""--mode=eval and --mode=export: work on the latest checkpoint of a run."""

from __future__ import annotations

import logging
import os

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import models
from dyrep_jax.reporting import human
from dyrep_jax.train import Trainer, state_variables, to_host

log = logging.getLogger("dyrep_jax")


def _restored(config, workdir):
    trainer = Trainer(config, workdir)
    restored = trainer.restore()
    if restored is None:
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(os.path.abspath(workdir), 'checkpoints')}; train "
            "first (same command with --mode=train)")
    state, meta = restored
    return trainer, to_host(state_variables(state)), meta


def evaluate_latest(config, workdir) -> dict:
    """Test accuracy of the latest checkpoint, unfused and fused."""
    trainer, variables, meta = _restored(config, workdir)
    loss, top1 = trainer.evaluate(trainer.model, trainer.place.replicate(variables), "eval")
    fused = models.fuse_network(variables)
    f_loss, f_top1 = trainer.evaluate(trainer.deploy_model, trainer.place.replicate(fused),
                                      "eval_fused")
    log.info("epoch %d checkpoint: test top1 %.4f (loss %.4f); fused top1 %.4f (loss %.4f)",
             meta["epoch"], top1, loss, f_top1, f_loss)
    return {"epoch": meta["epoch"], "test_top1": top1, "test_loss": loss,
            "fused_test_top1": f_top1, "fused_test_loss": f_loss}


def export_latest(config, workdir) -> dict:
    """Fuse the latest checkpoint and write DIR/fused/ (orbax params + arch.json)."""
    trainer, variables, meta = _restored(config, workdir)
    fused = models.fuse_network(variables)
    params = models.count_params(fused)
    macs = models.count_macs(trainer.deploy_model, fused, trainer.image_shape)
    arch = {"model": config.model.name, "num_classes": trainer.num_classes,
            "width": config.model.width, "dtype": config.model.dtype,
            "image_shape": list(trainer.image_shape), "mean": [float(v) for v in trainer.mean],
            "std": [float(v) for v in trainer.std], "params": params, "macs": macs,
            "name": config.name, "epoch": meta["epoch"]}
    out = os.path.join(os.path.abspath(workdir), "fused")
    ckpt.save_fused(out, to_host(fused), arch)
    log.info("exported deploy network (params %s, MACs %s) to %s", human(params), human(macs),
             out)
    return {"fused_dir": out, "params": params, "macs": macs}
