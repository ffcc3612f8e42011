"""The static DBB baseline, as the reference builds it (its `convert_to_dbb`).

Every 3x3 conv becomes a 1x1 + 1x1_kxk + 1x1_avg + kxk block (fewer where the
geometry forbids a branch, e.g. padding != k // 2) and the BN that followed
the conv is removed (the model is built with `with_bn_after_3x3=False`). The
reference builds those blocks as new PyTorch modules after the model's own
init, so every weight starts from PyTorch's defaults: each conv kernel and
the kxk conv's bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), every BN gamma 1,
beta 0, running mean 0, var 1. It is *not* a function-preserving grow.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dyrep_jax.models.inits import torch_default_uniform
from dyrep_jax.rep import allowed_branches, grow_slot

DBB_BRANCHES = ("1x1", "1x1_kxk", "1x1_avg", "kxk")


def dbb_initial_branches(path, geometry):
    """The DBB rule: the DBB branches the geometry allows on every 3x3 slot, else None."""
    del path
    if geometry.kernel_size != 3:
        return None
    return tuple(b for b in DBB_BRANCHES if b in allowed_branches(geometry))


def fresh_block(key, plain, geometry, branches):
    """(params, stats) of a new block with `branches`, every weight at PyTorch's default.

    `plain` is the slot being replaced (its values are not used: only its
    structure, through `grow_slot`).
    """
    grow_key, init_key = jax.random.split(key)
    params, stats = grow_slot(grow_key, plain, geometry, branches)
    return reset_to_torch_defaults(params, init_key), stats


def reset_to_torch_defaults(tree, key):
    """Every conv (a dict with a 4-d `kernel`) and BN (a dict with `scale`) re-initialized."""
    out = {}
    for index, (name, node) in enumerate(tree.items()):
        if not isinstance(node, Mapping):
            out[name] = node
            continue
        node_key = jax.random.fold_in(key, index)
        if "kernel" in node:
            kernel, bias = torch_default_uniform(node_key, node["kernel"].shape)
            out[name] = {"kernel": kernel, **({"bias": bias} if "bias" in node else {})}
        elif "scale" in node:
            out[name] = {"scale": jnp.ones_like(node["scale"]), "bias": jnp.zeros_like(node["bias"])}
        else:
            out[name] = reset_to_torch_defaults(node, node_key)
    return out
