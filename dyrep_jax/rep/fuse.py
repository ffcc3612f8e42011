"""Fusion: any slot (plain or block, nested) -> one kxk kernel + bias.

Every branch is conv(s) followed by BN, so in inference mode each is an affine
map that can be written as one kxk conv over the zero-padded input. Groups are
read off the kernel shapes, so fusion needs no geometry.
"""

from __future__ import annotations

import jax.numpy as jnp

from dyrep_jax.rep.apply import is_block
from dyrep_jax.rep.bn import EPS, bn_affine


def fold_bn(kernel, bias, bn_params, bn_stats, eps=EPS):
    """conv (+bias) followed by BN -> conv with bias, exactly (inference mode)."""
    a, c = bn_affine(bn_params, bn_stats["mean"], bn_stats["var"], eps)
    return kernel * a, c + bias * a


def pad_to_kxk(kernel, k: int):
    """Centre a (kh, kw, i, o) kernel inside a k x k one."""
    kh, kw = kernel.shape[:2]
    ph, pw = (k - kh) // 2, (k - kw) // 2
    return jnp.pad(kernel, ((ph, k - kh - ph), (pw, k - kw - pw), (0, 0), (0, 0)))


def identity_kernel(k: int, in_per_group: int, channels: int):
    """kxk kernel of the (grouped) identity map: 1 at the centre tap of o's own input."""
    kern = jnp.zeros((k, k, in_per_group, channels), jnp.float32)
    return kern.at[k // 2, k // 2, jnp.arange(channels) % in_per_group, jnp.arange(channels)].set(1.0)


def avg_kernel(k: int, channels_per_group: int, channels: int):
    """kxk average pool as a grouped conv kernel (1/k^2 on each channel's own input)."""
    return identity_kernel(1, channels_per_group, channels)[0, 0][None, None] * jnp.full(
        (k, k, 1, 1), 1.0 / (k * k), jnp.float32
    )


def compose_1x1_kxk(k1, b1, k2, b2):
    """Kernel/bias of conv2(k2, b2) after conv1x1(k1, b1), per group.

    k1: (1, 1, cin/g, mid), k2: (k, k, mid/g, cout). The constant b1 passes
    through k2 as a bias; this is exact because the 1x1 output is padded with
    its own bias value (BN-value padding), i.e. k2 sees b1 at the borders too.
    """
    mid = k1.shape[3]
    mid_g = k2.shape[2]
    g = mid // mid_g
    cin_g = k1.shape[2]
    k, cout = k2.shape[0], k2.shape[3]
    a = k1[0, 0].reshape(cin_g, g, mid_g)  # (i, group, m)
    w = k2.reshape(k, k, mid_g, g, cout // g)  # (h, w, m, group, o)
    kernel = jnp.einsum("hwmjo,ijm->hwijo", w, a).reshape(k, k, cin_g, cout)
    b1g = b1.reshape(g, mid_g)  # (group, m)
    bias = jnp.einsum("hwmjo,jm->jo", w, b1g).reshape(cout) + b2
    return kernel, bias


def fuse_slot(params, stats=None, eps=EPS):
    """Return {'kernel', 'bias'} of the single conv equal to the slot in inference mode."""
    stats = stats or {}
    if not is_block(params):
        kernel = params["kernel"]
        bias = params.get("bias", jnp.zeros((kernel.shape[-1],), kernel.dtype))
        return {"kernel": kernel, "bias": bias}
    kxk = fuse_branch("kxk", params["kxk"], stats["kxk"], 0, 0, eps)
    k, in_per_group = kxk[0].shape[0], kxk[0].shape[2]
    total_k, total_b = kxk
    for branch in params:
        if branch == "kxk":
            continue
        kb = fuse_branch(branch, params[branch], stats[branch], k, in_per_group, eps)
        total_k, total_b = total_k + kb[0], total_b + kb[1]
    return {"kernel": total_k, "bias": total_b}


def fuse_branch(branch: str, bp, bs, k: int, in_per_group: int, eps=EPS):
    """(kernel kxk, bias) of one branch in inference mode.

    `in_per_group` (input channels per group, the kernel's third dim) is only
    needed by the identity branch.
    """
    if branch == "kxk":
        inner = fuse_slot(bp["conv"], bs.get("conv"), eps)
        return fold_bn(inner["kernel"], inner["bias"], bp["bn"], bs["bn"], eps)
    if branch in ("1x1", "1xk", "kx1"):
        kern = bp["conv"]["kernel"]
        zero = jnp.zeros((kern.shape[-1],), kern.dtype)
        kern, bias = fold_bn(kern, zero, bp["bn"], bs["bn"], eps)
        return pad_to_kxk(kern, k), bias
    if branch == "1x1_kxk":
        k1 = bp["conv1"]["kernel"]
        k1, b1 = fold_bn(k1, jnp.zeros((k1.shape[-1],), k1.dtype), bp["bn1"], bs["bn1"], eps)
        inner = fuse_slot(bp["conv2"], bs.get("conv2"), eps)
        kern, bias = compose_1x1_kxk(k1, b1, inner["kernel"], inner["bias"])
        return fold_bn(kern, bias, bp["bn2"], bs["bn2"], eps)
    if branch == "1x1_avg":
        if "conv" in bp:
            k1 = bp["conv"]["kernel"]
            k1, b1 = fold_bn(k1, jnp.zeros((k1.shape[-1],), k1.dtype), bp["bn"], bs["bn"], eps)
            cout = k1.shape[-1]
            # the average pool is channel-diagonal, so groups do not matter for it
            kern, bias = compose_1x1_kxk(k1, b1, avg_kernel(k, 1, cout), jnp.zeros((cout,)))
        else:
            c = bp["avgbn"]["scale"].shape[0]
            kern, bias = avg_kernel(k, 1, c), jnp.zeros((c,), jnp.float32)
        return fold_bn(kern, bias, bp["avgbn"], bs["avgbn"], eps)
    if branch == "id":
        c = bp["bn"]["scale"].shape[0]
        return fold_bn(identity_kernel(k, in_per_group, c), jnp.zeros((c,)), bp["bn"], bs["bn"], eps)
    raise ValueError(f"unknown branch '{branch}'")
