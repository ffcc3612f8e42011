"""Creating a model's variables (optionally already grown) and counting them."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from dyrep_jax.models.dbb import fresh_block
from dyrep_jax.rep import (
    BRANCH_NAMES,
    RepError,
    check_branches,
    get_at,
    set_at,
    top_level_slots,
)
from dyrep_jax.rep.introspect import slot_geometries
from dyrep_jax.rep.tree import to_plain_dict


def image_spec(input_shape, batch: int = 1):
    """A ShapeDtypeStruct for a batch of (H, W, C) images."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    return jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)


def init_variables(model, key, input_shape, initial_branches=None) -> dict:
    """{'params', 'batch_stats'} as plain dicts for images of `input_shape` (H, W, C).

    `initial_branches` is an optional rule `(slot path, ConvGeometry) ->
    branch names or None` (e.g. `dbb_initial_branches`); each top-level slot
    it names branches for becomes a new block with PyTorch-default weights,
    as the reference's static DBB conversion builds it (`dbb.fresh_block`).
    Without a rule every slot stays plain. Works under `jax.eval_shape`
    (shapes only, nothing computed).
    """
    x = image_spec(input_shape)
    rule = initial_branches
    # The non-partitionable threefry compiles several times faster on CPU, and
    # init runs unsharded anyway.
    with jax.threefry_partitionable(False):
        init_key, grow_key = jax.random.split(key)
        variables = to_plain_dict(compiled_init(model)(init_key, jnp.zeros(x.shape, x.dtype)))
        variables.setdefault("batch_stats", {})
        if rule is None:
            return variables
        return grow_slots(model, variables, x, grow_key, rule)


def compiled_init(model):
    """`model.init` as one compiled program (XLA drops its unused forward pass).

    Cached per model (modules compare by their fields) so that re-initializing
    the same architecture, grown or not, does not compile again.
    """
    try:
        return _cached_init(model)
    except TypeError:  # a module with unhashable fields: no caching
        return jax.jit(partial(model.init, train=False))


@lru_cache(maxsize=16)
def _cached_init(model):
    return jax.jit(partial(model.init, train=False))


def grow_slots(model, variables, x, key, rule) -> dict:
    """A fresh block at every top-level slot for which `rule(path, geometry)` names branches."""
    params, stats = variables["params"], variables["batch_stats"]
    geometries = slot_geometries(model, variables, x)
    for index, path in enumerate(top_level_slots(params)):
        if path not in geometries:
            raise RepError(f"{'.'.join(path)}: slot was not reached by the model's forward pass")
        geometry = geometries[path].geometry
        branches = rule(path, geometry)
        if not branches:
            continue
        branches = check_branches(geometry, branches, path)
        block, block_stats = _fresh_compiled(jax.random.fold_in(key, index),
                                             get_at(params, path), geometry, branches)
        params = set_at(params, path, in_branch_order(block))
        stats = set_at(stats, path, in_branch_order(block_stats))
    return {**variables, "params": params, "batch_stats": stats}


def in_branch_order(block):
    """A block's branches in reference order (a compiled function returns keys sorted)."""
    return {branch: block[branch] for branch in BRANCH_NAMES if branch in block}


# Compiled once per (geometry, branches): networks repeat a few geometries many times.
_fresh_compiled = jax.jit(fresh_block, static_argnames=("geometry", "branches"))


def count_params(variables) -> int:
    """Number of trainable parameters (BN running statistics excluded).

    Takes a params tree or a whole variables dict, in any structure (plain,
    grown, fused) and also abstract leaves from `jax.eval_shape`.
    """
    if isinstance(variables, Mapping) and "params" in variables:
        variables = variables["params"]
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables)))
