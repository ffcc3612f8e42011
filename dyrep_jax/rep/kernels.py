"""Kernel algebra for fusion: BN folding, padding to kxk, identity/average kernels, 1x1 -> kxk.

Every branch in inference mode is an affine map; these helpers write such maps as one
kxk kernel + bias. Groups are read off the kernel shapes.
"""

from __future__ import annotations

import jax.numpy as jnp

from dyrep_jax.rep.bn import EPS, bn_affine


def fold_bn(kernel, bias, bn_params, bn_stats, eps=EPS):
    """conv (+bias) followed by BN -> conv with bias, exactly (inference mode)."""
    a, c = bn_affine(bn_params, bn_stats["mean"], bn_stats["var"], eps)
    return kernel * a, c + bias * a


def zero_bias(kernel):
    return jnp.zeros((kernel.shape[-1],), kernel.dtype)


def pad_to_kxk(kernel, k: int):
    """Centre a (kh, kw, i, o) kernel inside a k x k one."""
    kh, kw = kernel.shape[:2]
    ph, pw = (k - kh) // 2, (k - kw) // 2
    return jnp.pad(kernel, ((ph, k - kh - ph), (pw, k - kw - pw), (0, 0), (0, 0)))


def identity_kernel(k: int, in_per_group: int, channels: int, dtype=jnp.float32):
    """kxk kernel of the (grouped) identity map: 1 at the centre tap of o's own input."""
    kern = jnp.zeros((k, k, in_per_group, channels), dtype)
    return kern.at[k // 2, k // 2, jnp.arange(channels) % in_per_group, jnp.arange(channels)].set(1.0)


def avg_kernel(k: int, channels: int, dtype=jnp.float32):
    """kxk average pool as a depthwise kernel (1/k^2 on each channel's own input)."""
    return identity_kernel(1, 1, channels, dtype) * jnp.full((k, k, 1, 1), 1.0 / (k * k), dtype)


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
