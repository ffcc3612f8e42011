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

from dyrep_jax.rep.apply import is_block
from dyrep_jax.rep.bn import EPS, init_bn
from dyrep_jax.rep.fuse import fuse_branch
from dyrep_jax.rep.geometry import (
    ConvGeometry,
    RepError,
    check_branches,
    check_geometry,
    describe,
)

LAST_BN_GAMMA = 0.01


def fan_out_normal(key, shape):
    kh, kw, _, out = shape
    return jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / (kh * kw * out))


def init_branch(key, branch: str, geom: ConvGeometry, last_gamma: float = LAST_BN_GAMMA):
    """(params, stats) of one new non-kxk branch for `geom`."""
    k, g = geom.kernel_size, geom.groups
    cin, cout = geom.in_channels, geom.out_channels
    k1, k2 = jax.random.split(key)
    if branch in ("1x1", "1xk", "kx1"):
        shape = {"1x1": (1, 1), "1xk": (1, k), "kx1": (k, 1)}[branch]
        bn_p, bn_s = init_bn(cout, last_gamma)
        kern = fan_out_normal(k1, (*shape, cin // g, cout))
        return {"conv": {"kernel": kern}, "bn": bn_p}, {"bn": bn_s}
    if branch == "1x1_kxk":
        mid = cin
        bn1_p, bn1_s = init_bn(mid)
        bn2_p, bn2_s = init_bn(cout, last_gamma)
        params = {
            "conv1": {"kernel": fan_out_normal(k1, (1, 1, cin // g, mid))},
            "bn1": bn1_p,
            "conv2": {"kernel": fan_out_normal(k2, (k, k, mid // g, cout))},
            "bn2": bn2_p,
        }
        return params, {"bn1": bn1_s, "bn2": bn2_s}
    if branch == "1x1_avg":
        avg_p, avg_s = init_bn(cout, last_gamma)
        if geom.is_depthwise:
            return {"avgbn": avg_p}, {"avgbn": avg_s}
        bn_p, bn_s = init_bn(cout)
        kern = fan_out_normal(k1, (1, 1, cin // g, cout))
        return {"conv": {"kernel": kern}, "bn": bn_p, "avgbn": avg_p}, {"bn": bn_s, "avgbn": avg_s}
    if branch == "id":
        bn_p, bn_s = init_bn(cout, last_gamma)
        return {"bn": bn_p}, {"bn": bn_s}
    raise RepError(f"cannot initialize branch '{branch}'")


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
        if branch == "kxk":
            bn_p, bn_s = init_bn(geom.out_channels)
            kern = params["kernel"]
            bias = params.get("bias", jnp.zeros((geom.out_channels,), kern.dtype))
            block_p["kxk"] = {"conv": {"kernel": kern, "bias": bias}, "bn": bn_p}
            block_s["kxk"] = {"bn": bn_s}
        else:
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
    k, in_per_group = t_kernel.shape[0], t_kernel.shape[2]
    rest_k = jnp.zeros_like(t_kernel)
    rest_b = jnp.zeros_like(t_bias)
    for branch in block_params:
        if branch == "kxk":
            continue
        bk, bb = fuse_branch(branch, block_params[branch], block_stats[branch], k, in_per_group,
                             eps)
        rest_k, rest_b = rest_k + bk, rest_b + bb
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
