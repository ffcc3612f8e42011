"""Cut (Dep): remove branches from a block, absorbing them into kxk exactly.

A removed branch is an affine map (its fused kernel + bias in inference mode).
It is added to the kxk conv *before* the kxk BN, scaled by std/gamma of that
BN, so the block's inference output is unchanged. When kxk's BN has a gamma
too close to zero for that division, the kxk BN is folded into its conv and
reset to identity instead (still exact). A block left with only kxk becomes a
plain slot again.
"""

from __future__ import annotations

import jax.numpy as jnp

from dyrep_jax.rep.apply import is_block
from dyrep_jax.rep.bn import EPS, bn_affine, init_bn
from dyrep_jax.rep.fuse import fuse_branch, fuse_slot
from dyrep_jax.rep.geometry import BRANCH_NAMES, RepError, describe

SMALL_GAMMA = 1e-3


def scale_block_output(params, a, c):
    """Block computing a * block(x) + c, by rescaling each branch's last BN (exact).

    Used to fold an outer BN into a nested block when the outer block dissolves.
    """
    last_bn = {"kxk": "bn", "1x1": "bn", "1x1_kxk": "bn2", "1x1_avg": "avgbn", "1xk": "bn",
               "kx1": "bn", "id": "bn"}
    new = {}
    for branch, bp in params.items():
        name = last_bn[branch]
        bn = bp[name]
        shift = c if branch == "kxk" else 0.0
        new[branch] = {**bp, name: {"scale": bn["scale"] * a, "bias": bn["bias"] * a + shift}}
    return new


def absorb_into_kxk(params, stats, delta_kernel, delta_bias, eps=EPS):
    """Add an affine map (kernel, bias in fused space) to the block's kxk branch."""
    kxk_p, kxk_s = params["kxk"], stats["kxk"]
    a, c = bn_affine(kxk_p["bn"], kxk_s["bn"]["mean"], kxk_s["bn"]["var"], eps)
    if bool(jnp.all(jnp.abs(kxk_p["bn"]["scale"]) > SMALL_GAMMA)):
        conv = kxk_p["conv"]
        inv = 1.0 / a
        if is_block(conv):
            # add to the nested block's own kxk, mapped through the outer BN
            inner_p, inner_s = absorb_into_kxk(conv, kxk_s["conv"], delta_kernel * inv,
                                               delta_bias * inv, eps)
            return ({**params, "kxk": {**kxk_p, "conv": inner_p}},
                    {**stats, "kxk": {**kxk_s, "conv": inner_s}})
        bias = conv.get("bias", jnp.zeros_like(delta_bias))
        new_conv = {"kernel": conv["kernel"] + delta_kernel * inv, "bias": bias + delta_bias * inv}
        return {**params, "kxk": {**kxk_p, "conv": new_conv}}, stats
    # fallback: fold the whole kxk branch, reset its BN to identity
    fused = fuse_branch("kxk", kxk_p, kxk_s, 0, 0, eps)
    std = jnp.sqrt(1.0 + eps)
    bn_p, bn_s = init_bn(delta_bias.shape[0])
    new_conv = {"kernel": (fused[0] + delta_kernel) * std, "bias": (fused[1] + delta_bias) * std}
    return {**params, "kxk": {"conv": new_conv, "bn": bn_p}}, {**stats, "kxk": {"bn": bn_s}}


def cut_branches(params, stats, names, path=None, eps=EPS):
    """Remove `names` from a block; returns (slot_params, slot_stats), function preserved.

    If only kxk remains the slot becomes plain (kernel + bias), or, when kxk's
    conv is itself a block, that nested block with the outer BN folded in.
    """
    where = describe(path)
    if not is_block(params):
        raise RepError(f"{where}: cannot cut branches from a plain slot")
    names = tuple(names)
    for name in names:
        if name not in BRANCH_NAMES:
            raise RepError(f"{where}: unknown branch '{name}' (valid: {', '.join(BRANCH_NAMES)})")
        if name == "kxk":
            raise RepError(f"{where}: branch 'kxk' is the main branch and cannot be cut")
        if name not in params:
            raise RepError(f"{where}: branch '{name}' is not in this block ({', '.join(params)})")
    fused_kxk = fuse_slot(params["kxk"]["conv"], stats["kxk"].get("conv"), eps)["kernel"]
    k, in_per_group = fused_kxk.shape[0], fused_kxk.shape[2]
    dk = jnp.zeros_like(fused_kxk)
    db = jnp.zeros((fused_kxk.shape[-1],), fused_kxk.dtype)
    for name in names:
        bk, bb = fuse_branch(name, params[name], stats[name], k, in_per_group, eps)
        dk, db = dk + bk, db + bb
    kept_p = {b: v for b, v in params.items() if b not in names}
    kept_s = {b: v for b, v in stats.items() if b not in names}
    kept_p, kept_s = absorb_into_kxk(kept_p, kept_s, dk, db, eps)
    if set(kept_p) != {"kxk"}:
        return kept_p, kept_s
    return dissolve_block(kept_p, kept_s, eps)


def dissolve_block(params, stats, eps=EPS):
    """A block holding only kxk -> the equivalent slot one level up."""
    kxk_p, kxk_s = params["kxk"], stats["kxk"]
    conv = kxk_p["conv"]
    if is_block(conv):
        a, c = bn_affine(kxk_p["bn"], kxk_s["bn"]["mean"], kxk_s["bn"]["var"], eps)
        return scale_block_output(conv, a, c), kxk_s["conv"]
    kernel, bias = fuse_branch("kxk", kxk_p, kxk_s, 0, 0, eps)
    return {"kernel": kernel, "bias": bias}, {}
