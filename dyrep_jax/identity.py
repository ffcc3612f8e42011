"""What a checkpoint belongs to: the run's identity, checked on resume, eval and export.

A checkpoint's pytree restores whatever network it holds, so restoring it
under another config does not fail by itself: it trains or evaluates a
different network. The `meta` item therefore records
- `identity`: what defines the network and its data (model, width, classes,
  DyRep mode, image shape, dataset, ghost-BN group). A mismatch is refused,
  naming the field, both values and what to do.
- `settings`: what may change on resume (epochs, lr, dtype, logging...). A
  change is logged. `steps_per_epoch` is a setting for eval/export but must
  match on resume: the data position is counted in batches.
Checkpoints written before these records have only `meta.model`, which is
checked alone (with a log line).
"""

from __future__ import annotations

import logging

from dyrep_jax.errors import CheckpointError

log = logging.getLogger("dyrep_jax")

# identity field -> the config field that sets it (for the message)
IDENTITY_FLAGS = {  # checked in this order: a new dataset is named as such, not by its shape
    "model": "model.name", "dataset": "data.dataset", "width": "model.width",
    "num_classes": "model.num_classes", "mode": "dyrep.mode", "image_shape": "data.image_size",
    "bn_group_size": "model.bn_group_size",
}
SETTING_FIELDS = {
    "num_epochs": "num_epochs", "batch_size": "batch_size", "lr": "optim.lr",
    "dtype": "model.dtype", "seed": "seed", "log_every_steps": "log_every_steps",
}


def run_identity(config, *, num_classes: int, image_shape) -> dict:
    """The `identity` record of an experiment (`num_classes`, `image_shape` as resolved)."""
    return {"model": config.model.name, "width": float(config.model.width),
            "num_classes": int(num_classes), "mode": config.dyrep.mode,
            "image_shape": [int(v) for v in image_shape], "dataset": config.data.dataset,
            "bn_group_size": int(config.model.bn_group_size)}


def run_settings(config, *, steps_per_epoch: int) -> dict:
    """The `settings` record: fields that may change on resume, plus the data position unit."""
    settings = {name: _get(config, field) for name, field in SETTING_FIELDS.items()}
    return {**settings, "steps_per_epoch": int(steps_per_epoch)}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_identity(meta: dict, identity: dict, settings: dict, where: str,
                   resuming: bool) -> None:
    """Refuse a checkpoint of another network; log the settings that changed."""
    saved = meta.get("identity")
    if saved is None:
        log.info("checkpoint in %s predates identity records: only its model name is checked",
                 where)
        saved = {"model": meta["model"]} if "model" in meta else {}
    for field in IDENTITY_FLAGS:
        value = identity[field]
        if field in saved and _norm(saved[field]) != _norm(value):
            flag = IDENTITY_FLAGS[field]
            raise CheckpointError(
                f"the checkpoint in {where} is of another network: {field} is "
                f"{saved[field]!r} there but {value!r} in this config ({flag}). Use another "
                f"--workdir for a new run, or pass the checkpoint's value "
                f"(--config.{flag}=...) to continue this one.")
    old = meta.get("settings") or {}
    if resuming and "steps_per_epoch" in old and old["steps_per_epoch"] != settings[
            "steps_per_epoch"]:
        raise CheckpointError(
            f"the checkpoint in {where} was written with {old['steps_per_epoch']} steps per "
            f"epoch, this config has {settings['steps_per_epoch']} (batch_size or "
            "data.max_train_examples changed): the resume position would be wrong. Pass the "
            f"checkpoint's batch_size ({old.get('batch_size')}) or use another --workdir.")
    changed = {k: (old[k], v) for k, v in settings.items() if k in old and old[k] != v}
    if changed and resuming:
        log.info("resuming with changed settings: %s", ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))


def _norm(value):
    """Compare lists and tuples, ints and floats alike (JSON round trip)."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
