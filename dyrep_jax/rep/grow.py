"""Grow: a plain slot becomes a multi-branch block with the same function.

New branches start as the reference initializes them (convs normal with std
sqrt(2 / fan_out), fan_out = kh * kw * out; the last BN of each new branch has
gamma 0.01, the others 1). The `kxk` branch then takes whatever is left so that
the block's inference output equals the old conv exactly:
`kxk = old - fused(other branches)`, given the block's running statistics.
After BN calibration changes those statistics, call `rebalance_kxk` again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dyrep_jax.rep.bn import EPS, init_bn
from dyrep_jax.rep.branches import KINDS, fan_out_normal
from dyrep_jax.rep.fuse import fuse_branches
from dyrep_jax.rep.geometry import (
    ConvGeometry,
    RepError,
    check_branches,
    check_geometry,
    describe,
)
from dyrep_jax.rep.ops import is_block

__all__ = ["LAST_BN_GAMMA", "fan_out_normal", "grow_slot", "identity_bn_std", "init_branch",
           "rebalance_kxk", "regrow_matching", "reset_kxk_stats"]

LAST_BN_GAMMA = 0.01


def init_branch(key, branch: str, geom: ConvGeometry, last_gamma: float = LAST_BN_GAMMA):
    """(params, stats) of one new branch for `geom`, as the reference initializes it."""
    if branch not in KINDS:
        raise RepError(f"cannot initialize branch '{branch}'")
    return KINDS[branch].init(key, geom, last_gamma)


def check_plain_slot(params, geom: ConvGeometry, path=None):
    where = describe(path)
    if is_block(params):
        raise RepError(f"{where}: slot is already a block; grow a plain slot")
    want = (geom.kernel_size, geom.kernel_size, geom.in_channels // geom.groups, geom.out_channels)
    if tuple(params["kernel"].shape) != want:
        raise RepError(
            f"{where}: kernel shape {tuple(params['kernel'].shape)} does not match geometry "
            f"{geom} (expected {want})"
        )


def identity_bn_std(eps=EPS):
    """std of a BN reset to mean 0, var 1: the kxk conv is scaled by it to cancel."""
    return jnp.sqrt(1.0 + eps)


def grow_slot(key, params, geom: ConvGeometry, branches, path=None, eps=EPS,
              last_gamma: float = LAST_BN_GAMMA):
    """Plain slot -> block with `branches` (kxk always included), same inference output.

    `last_gamma` is the new branches' last-BN scale (0.01 as DyRep; RepVGG's
    training form starts its branches at 1.0). Returns (block_params, block_stats). Running statistics start at mean 0 /
    var 1; after calibrating them, call `rebalance_kxk(block, stats, params)`.
    """
    check_geometry(geom, path)
    check_plain_slot(params, geom, path)
    branches = check_branches(geom, branches, path)
    keys = jax.random.split(key, len(branches))
    block_p, block_s = {}, {}
    for bkey, branch in zip(keys, branches, strict=True):
        block_p[branch], block_s[branch] = init_branch(bkey, branch, geom, last_gamma)
    return rebalance_kxk(block_p, block_s, params, eps), block_s


def rebalance_kxk(block_params, block_stats, target, eps=EPS):
    """Set the kxk branch so the block fuses to `target` ({'kernel', 'bias'?}).

    The kxk BN is reset to the identity (gamma 1, beta 0; its running stats to
    mean 0 / var 1 must match: they are reset in `block_stats` by the caller via
    `reset_kxk_stats`). Requires the kxk conv to be plain.
    """
    if is_block(block_params["kxk"]["conv"]):
        raise RepError("rebalance_kxk needs a plain kxk conv (it was grown further)")
    t_kernel = target["kernel"]
    t_bias = target.get("bias", jnp.zeros((t_kernel.shape[-1],), t_kernel.dtype))
    rest = [b for b in block_params if b != "kxk"]
    rest_k, rest_b = fuse_branches(block_params, block_stats, rest, t_kernel, eps)
    std = identity_bn_std(eps)
    new = dict(block_params)
    bn_p, _ = init_bn(t_kernel.shape[-1])
    new["kxk"] = {
        "conv": {"kernel": (t_kernel - rest_k) * std, "bias": (t_bias - rest_b) * std},
        "bn": bn_p,
    }
    return new


def reset_kxk_stats(block_stats):
    """kxk BN running stats back to mean 0 / var 1 (paired with `rebalance_kxk`)."""
    c = block_stats["kxk"]["bn"]["mean"].shape[0]
    _, bn_s = init_bn(c)
    new = dict(block_stats)
    new["kxk"] = {**block_stats["kxk"], "bn": bn_s}
    return new


def regrow_matching(block_params, block_stats, old_params, eps=EPS):
    """After calibrating a new block's stats: reset kxk stats and re-match the old conv."""
    stats = reset_kxk_stats(block_stats)
    return rebalance_kxk(block_params, stats, old_params, eps), stats
