"""Cut (Dep): remove branches from a block; the kxk branch takes what they did, exactly.

As the reference: the block's fused kernel + bias (inference mode) minus the remaining
non-kxk branches goes into the kxk conv (with bias), and the kxk BN is reset to gamma 1,
beta 0, mean 0. Unlike the reference (var 1, off by 1 - 1/sqrt(1 + eps)) its running var
is 1 - eps, so that BN is an exact identity and later importances are ratios to 1. A
kxk conv that is itself a block keeps its branches (the reference re-initialises them);
its own kxk takes the remainder the same way. A block left with only kxk becomes one plain
conv with bias (nested blocks folded in), which may grow again.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dyrep_jax.rep.bn import EPS
from dyrep_jax.rep.branches import BRANCH_NAMES
from dyrep_jax.rep.fuse import fuse_branches, fuse_slot
from dyrep_jax.rep.geometry import RepError, describe
from dyrep_jax.rep.ops import is_block

__all__ = ["assign_to_kxk", "cut_branches", "identity_bn", "identity_var"]


def identity_var(eps=EPS, dtype=jnp.float32):
    """The running var v (in `dtype`) with v + eps == 1 exactly, so 1/sqrt(v + eps) is 1."""
    one = np.asarray(1.0, dtype)
    v = np.asarray(one - np.asarray(eps, dtype), dtype)
    for _ in range(4):  # rounding: step to the neighbour whose sum is exactly 1
        total = v + np.asarray(eps, dtype)
        if total == one:
            break
        v = np.nextafter(v, -np.inf if total > one else np.inf).astype(dtype)
    return v


def identity_bn(channels: int, eps=EPS, dtype=jnp.float32):
    """(params, stats) of a BN that is exactly the identity in inference mode."""
    params = {"scale": jnp.ones((channels,), dtype), "bias": jnp.zeros((channels,), dtype)}
    stats = {"mean": jnp.zeros((channels,), dtype),
             "var": jnp.full((channels,), identity_var(eps, dtype), dtype)}
    return params, stats


def assign_to_kxk(params, stats, kernel, bias, eps=EPS):
    """The block with its kxk branch set so the whole block fuses to (kernel, bias).

    kxk's BN becomes an exact identity; a nested kxk block keeps its branches and its own
    kxk takes the remainder (recursively).
    """
    rest = [b for b in params if b != "kxk"]
    rest_k, rest_b = fuse_branches(params, stats, rest, kernel, eps)
    kernel, bias = kernel - rest_k, bias - rest_b
    dtype = params["kxk"]["bn"]["scale"].dtype
    bn_p, bn_s = identity_bn(bias.shape[0], eps, dtype)
    conv, kxk_s = params["kxk"]["conv"], {"bn": bn_s}
    if is_block(conv):
        conv, kxk_s["conv"] = assign_to_kxk(conv, stats["kxk"]["conv"], kernel, bias, eps)
    else:
        conv = {"kernel": kernel, "bias": bias}
    return {**params, "kxk": {"conv": conv, "bn": bn_p}}, {**stats, "kxk": kxk_s}


def check_cut(params, names, where: str) -> None:
    if not is_block(params):
        raise RepError(f"{where}: cannot cut branches from a plain slot")
    for name in names:
        if name not in BRANCH_NAMES:
            raise RepError(f"{where}: unknown branch '{name}' (valid: {', '.join(BRANCH_NAMES)})")
        if name == "kxk":
            raise RepError(f"{where}: branch 'kxk' is the main branch and cannot be cut")
        if name not in params:
            raise RepError(f"{where}: branch '{name}' is not in this block ({', '.join(params)})")


def cut_branches(params, stats, names, path=None, eps=EPS):
    """Remove `names` from a block; returns (slot_params, slot_stats), function preserved.

    If only kxk remains the slot becomes plain: one kernel + bias, nested blocks folded in.
    """
    names = tuple(names)
    check_cut(params, names, describe(path))
    whole = fuse_slot(params, stats, eps)
    kept_p = {b: v for b, v in params.items() if b not in names}
    if set(kept_p) == {"kxk"}:
        return whole, {}
    kept_s = {b: v for b, v in stats.items() if b not in names}
    return assign_to_kxk(kept_p, kept_s, whole["kernel"], whole["bias"], eps)
