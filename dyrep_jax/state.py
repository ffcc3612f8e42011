"""The train state: one typed dict, one constructor, one checkpoint conversion pair.

A plain dict (not a dataclass) because jit, orbax and `tree_map` take it as it
is, and because the network's structure lives in `params` itself. What is not
in it, and why:
- the random key of a step is `fold_in(seed, step)`, a function of `step`;
- the data position is (epoch, step in epoch), recorded in the checkpoint's
  meta (see `checkpoint.py`), since a batch is a pure function of it.

On disk (`checkpoint.py`) the state is two items: `state` (everything but the
optimizer, restored without a template) and `opt` (restored against
`tx.init(params)`). orbax stores no empty arrays, so a state without eligible
slots is saved without `scores`; `from_checkpoint` puts the empty array back.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np


class TrainState(TypedDict):
    params: dict  # the network, structure included (grown slots are sub-trees)
    batch_stats: dict  # BN running statistics, same tree layout as params
    opt_state: Any  # optax state for `params`
    scores: Any  # float32 (num eligible slots,): saliency summed since the last adjustment
    score_steps: Any  # int32 scalar: steps summed into `scores`
    step: Any  # int32 scalar: global optimizer step (drives the LR schedule and the rng)


CHECKPOINT_KEYS = ("params", "batch_stats", "scores", "score_steps", "step")


def new_train_state(variables: dict, opt_state, *, num_scores: int, step=0) -> TrainState:
    """A state with zeroed scores for `num_scores` eligible slots."""
    return TrainState(
        params=variables["params"], batch_stats=variables["batch_stats"], opt_state=opt_state,
        scores=np.zeros((num_scores,), np.float32), score_steps=np.zeros((), np.int32),
        step=np.asarray(step, np.int32))


def variables_of(state: TrainState) -> dict:
    """The flax variables (`params`, `batch_stats`) of a state."""
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def mean_scores(state: TrainState) -> np.ndarray:
    """Per-step mean of the accumulated scores (host copy)."""
    return np.asarray(state["scores"]) / max(int(state["score_steps"]), 1)


def to_checkpoint(state: TrainState) -> tuple[dict, Any]:
    """(the `state` item, the `opt` item) of a host-side state."""
    item = {k: state[k] for k in CHECKPOINT_KEYS}
    if np.size(item["scores"]) == 0:  # orbax cannot store an empty array
        del item["scores"]
    return item, state["opt_state"]


def from_checkpoint(item: dict, opt_state=None) -> TrainState:
    """The inverse of `to_checkpoint`; also reads runs written before this module existed.

    `opt_state=None` when the optimizer was not read (evaluation, tools).
    """
    missing = {"params"} - set(item)
    if missing:
        raise ValueError(f"checkpoint state item lacks {sorted(missing)}; not a dyrep_jax run")
    return TrainState(
        params=item["params"], batch_stats=item.get("batch_stats", {}), opt_state=opt_state,
        scores=np.asarray(item.get("scores", np.zeros((0,), np.float32)), np.float32),
        score_steps=np.asarray(item.get("score_steps", 0), np.int32),
        step=np.asarray(item.get("step", 0), np.int32))
