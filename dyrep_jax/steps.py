"""Jitted train/eval/calibration steps, one compiled program per network structure.

`StepCache` (a `programs.ProgramCache`) keys compiled programs by the pytree structure
of the state, so a structure change (grow/cut) compiles once and a return to a seen
structure compiles never. The trainer prefetches the next structure's train and eval
programs, which then compile side by side; compile wall seconds are counted for the logs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dyrep_jax import saliency
from dyrep_jax.data import augment_on_device, normalize_images
from dyrep_jax.programs import ProgramCache
from dyrep_jax.state import TrainState


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def make_train_step(model, tx, schedule, *, eligible, metric, num_classes, label_smoothing,
                    mean, std, augment_kind, dtype, fail_at_step=-1, bn_counts=None):
    """(TrainState, images uint8, labels, rng) -> (TrainState, metrics) for one structure.

    `bn_counts`: values per channel of each eligible slot's following BN
    (`saliency.bn_counts`), for the exact batch variance of stable synflow.
    """

    def train_step(state, images, labels, rng):
        aug_key, score_key = jax.random.split(rng)
        x = augment_on_device(aug_key, images, mean, std, augment_kind).astype(dtype)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                mutable=["batch_stats"])
            loss = cross_entropy(logits, labels, num_classes, label_smoothing).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        if fail_at_step >= 0:  # test hook: a NaN loss at one step
            loss = jnp.where(state["step"] == fail_at_step, jnp.nan, loss)
        scores = saliency.accumulate(state["scores"], grads, state["params"],
                                     state["batch_stats"], batch_stats, eligible, metric,
                                     score_key, bn_counts)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = TrainState(
            params=optax.apply_updates(state["params"], updates), batch_stats=batch_stats,
            opt_state=opt_state, scores=scores, score_steps=state["score_steps"] + 1,
            step=state["step"] + 1)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        metrics = {"loss": loss, "correct": correct, "lr": schedule(state["step"])}
        return new_state, metrics

    return train_step


def make_eval_step(model, *, num_classes, mean, std, dtype):
    """(variables, images, labels, mask) -> sums of loss, correct, count."""

    def eval_step(variables, images, labels, mask):
        x = normalize_images(images, mean, std).astype(dtype)
        logits = model.apply(variables, x, train=False)
        loss = cross_entropy(logits, labels, num_classes)
        m = mask.astype(jnp.float32)
        return {
            "loss": jnp.sum(loss * m),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * m),
            "count": jnp.sum(m),
        }

    return eval_step


def make_prepare_images(mean, std, augment_kind, dtype):
    """uint8 train batch -> augmented, normalized compute-dtype images (for calibration)."""

    def prepare(rng, images):
        return augment_on_device(rng, images, mean, std, augment_kind).astype(dtype)

    return prepare


def batch_specs(global_batch: int, image_shape, sharding=None, *, mask: bool = False):
    """Abstract (images uint8, labels int32[, mask bool]) of one global batch (the data
    contract of `dyrep_jax.data`), to compile a step before its first batch arrives."""
    images = jax.ShapeDtypeStruct((global_batch, *image_shape), jnp.uint8, sharding=sharding)
    labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding)
    if not mask:
        return images, labels
    return images, labels, jax.ShapeDtypeStruct((global_batch,), jnp.bool_, sharding=sharding)


class StepCache(ProgramCache):
    """The train/eval programs of a run (one per structure), compiled ahead of time."""
