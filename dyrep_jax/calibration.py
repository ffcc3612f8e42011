"""BN calibration: cumulative-average batch statistics over a few training batches.

Two uses, both as in the reference: a newly grown block's BNs before it is
re-matched (`calibrate_block`: the rest of the network runs in inference mode),
and every BN of the network between adjustments (`calibrate_network`). The
statistics of each batch come from compiled programs, so with sharded
(global) batches they are global-batch statistics on every host; the result is
the plain mean over batches (no momentum). Programs come from `PROGRAMS`, so a
recalibration of a structure seen before, or a block of a geometry and structure seen
before, compiles nothing; their compile seconds count in the process's compile clock.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

from dyrep_jax.programs import ProgramCache
from dyrep_jax.rep.apply import apply_slot as run_slot
from dyrep_jax.rep.apply import inner_slot_input
from dyrep_jax.rep.bn import MOMENTUM
from dyrep_jax.rep.introspect import capture_slot_inputs
from dyrep_jax.rep.network import geometry_at, split_slot_path
from dyrep_jax.rep.tree import get_at

# Calibration programs of this process: one per network structure for the slot-input and
# whole-network passes, one per (geometry, block structure) for a block's statistics.
PROGRAMS = ProgramCache(workers=1, max_entries=32)


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


def compiled(name, fn, programs: ProgramCache | None = None):
    """`fn` as a callable that runs the program `programs` compiled for its inputs."""
    programs = PROGRAMS if programs is None else programs

    def call(*args):
        return programs.get(name, fn, args)(*args)

    return call


def calibrate_network(model, variables, batches: Iterable):
    """Every BN's statistics as the mean of per-batch moments over `batches`."""
    batch_stats_of = compiled(("calibrate_network", model), network_batch_stats_fn(model))
    stats = mean_over_batches(batch_stats_of, variables, batches)
    return variables["batch_stats"] if stats is None else stats


def slot_input_fn(model, top):
    """(variables, images) -> input of the top-level slot `top`, network in inference mode."""

    def slot_input(variables, images):
        return capture_slot_inputs(model, variables, images, [top])[top]

    return slot_input


def block_batch_stats_fn(top_geom, rel_path, branches, geom):
    """(top slot params, its stats, its input) -> batch stats of the block at `rel_path`
    inside it. Depends on geometry and block structure only, so one program serves every
    slot of that geometry and every adjustment."""

    def block_batch_stats(top_params, top_stats, x):
        x = inner_slot_input(top_params, top_stats, x, top_geom, branches)
        _, batch_stats = run_slot(get_at(top_params, rel_path), get_at(top_stats, rel_path, {}),
                                  x, geom, train=True, momentum=1.0)
        return batch_stats

    return block_batch_stats


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
    rel_path = tuple(path)[len(top):]
    slot_input = compiled(("calibrate_slot_input", model, top), slot_input_fn(model, top))
    block_stats = compiled(("calibrate_block", top_geom, rel_path, tuple(branches), geom),
                           block_batch_stats_fn(top_geom, rel_path, branches, geom))

    def batch_stats_of(variables, images):
        p, s = variables["params"], variables["batch_stats"]
        return block_stats(get_at(p, top), get_at(s, top, {}), slot_input(variables, images))

    stats = mean_over_batches(batch_stats_of, variables, batches)
    return get_at(variables["batch_stats"], path, {}) if stats is None else stats
