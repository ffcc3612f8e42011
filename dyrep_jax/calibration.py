"""BN calibration: cumulative-average batch statistics over a few training batches.

Two uses, both as in the reference: a newly grown block's BNs before it is
re-matched (`calibrate_block`: the rest of the network runs in inference mode),
and every BN of the network between adjustments (`calibrate_network`). The
statistics of each batch come from one jitted function, so with sharded
(global) batches they are global-batch statistics on every host; the result is
the plain mean over batches (no momentum).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

from dyrep_jax.rep.apply import apply_slot as run_slot
from dyrep_jax.rep.apply import inner_slot_input
from dyrep_jax.rep.bn import MOMENTUM
from dyrep_jax.rep.introspect import capture_slot_inputs
from dyrep_jax.rep.network import geometry_at, split_slot_path
from dyrep_jax.rep.tree import get_at


def mean_over_batches(batch_stats_of, variables, batches: Iterable):
    """Mean of `batch_stats_of(variables, images)` over `batches`; None when there are none."""
    total, count = None, 0
    for images in batches:
        stats = batch_stats_of(variables, images)
        total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
        count += 1
    if count == 0:
        return None
    return jax.tree_util.tree_map(lambda t: t / count, total)


def network_batch_stats_fn(model):
    """(variables, images) -> batch statistics of every BN for one batch (train mode).

    Running stats are zeroed first, so the update `(1 - m) * 0 + m * batch`
    returns batch statistics scaled by the momentum, which we undo.
    """

    def batch_stats_of(variables, x):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
        _, updates = model.apply({"params": variables["params"], "batch_stats": zeros}, x,
                                 train=True, mutable=["batch_stats"])
        return jax.tree_util.tree_map(lambda s: s / MOMENTUM, updates["batch_stats"])

    return batch_stats_of


def calibrate_network(model, variables, batches: Iterable):
    """Every BN's statistics as the mean of per-batch moments over `batches`."""
    stats = mean_over_batches(jax.jit(network_batch_stats_fn(model)), variables, batches)
    return variables["batch_stats"] if stats is None else stats


def calibrate_block(model, variables, path, top_geometries, batches: Iterable):
    """Mean batch statistics of the block at `path` over `batches`.

    The rest of the network runs in inference mode (it is not changed); the
    block's own BNs see batch statistics, as in the reference calibration.
    """
    params = variables["params"]
    top, branches = split_slot_path(params, path)
    top_geom = top_geometries[top]
    top_geom = getattr(top_geom, "geometry", top_geom)
    geom = geometry_at(params, path, top_geometries)

    @jax.jit
    def block_batch_stats(variables, images):
        p, s = variables["params"], variables["batch_stats"]
        x = capture_slot_inputs(model, variables, images, [top])[top]
        x = inner_slot_input(get_at(p, top), get_at(s, top, {}), x, top_geom, branches)
        _, batch_stats = run_slot(get_at(p, path), get_at(s, path, {}), x, geom, train=True,
                                  momentum=1.0)
        return batch_stats

    stats = mean_over_batches(block_batch_stats, variables, batches)
    return get_at(variables["batch_stats"], path, {}) if stats is None else stats
