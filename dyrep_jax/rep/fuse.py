"""Fusion: any slot (plain or block, nested) -> one kxk kernel + bias.

Every branch is conv(s) followed by BN, so in inference mode each is an affine
map that can be written as one kxk conv over the zero-padded input (each kind's
`fuse` in `branches.py`). Groups are read off the kernel shapes, so fusion needs
no geometry.
"""

from __future__ import annotations

import jax.numpy as jnp

from dyrep_jax.rep.bn import EPS
from dyrep_jax.rep.branches import KINDS
from dyrep_jax.rep.kernels import fold_bn
from dyrep_jax.rep.ops import is_block

__all__ = ["fold_bn", "fuse_branch", "fuse_branches", "fuse_slot"]


def fuse_slot(params, stats=None, eps=EPS):
    """Return {'kernel', 'bias'} of the single conv equal to the slot in inference mode."""
    stats = stats or {}
    if not is_block(params):
        kernel = params["kernel"]
        bias = params.get("bias", jnp.zeros((kernel.shape[-1],), kernel.dtype))
        return {"kernel": kernel, "bias": bias}
    kernel, bias = fuse_branch("kxk", params["kxk"], stats["kxk"], 0, 0, eps)
    rest = [b for b in params if b != "kxk"]
    if rest:
        rest_k, rest_b = fuse_branches(params, stats, rest, kernel, eps)
        kernel, bias = kernel + rest_k, bias + rest_b
    return {"kernel": kernel, "bias": bias}


def fuse_branches(params, stats, names, like, eps=EPS):
    """Sum of (kernel, bias) of the branches `names` of a block, shaped like kernel `like`."""
    k, in_per_group = like.shape[0], like.shape[2]
    total_k = jnp.zeros_like(like)
    total_b = jnp.zeros((like.shape[-1],), like.dtype)
    for name in names:
        bk, bb = fuse_branch(name, params[name], stats[name], k, in_per_group, eps)
        total_k, total_b = total_k + bk, total_b + bb
    return total_k, total_b


def fuse_branch(branch: str, bp, bs, k: int, in_per_group: int, eps=EPS):
    """(kernel kxk, bias) of one branch in inference mode.

    `in_per_group` (input channels per group, the kernel's third dim) is only
    needed by the identity branch; `k` by every kind but kxk.
    """
    if branch not in KINDS:
        raise ValueError(f"unknown branch '{branch}'")
    return KINDS[branch].fuse(bp, bs, k, in_per_group, eps,
                              lambda p, s: fuse_slot(p, s, eps))
