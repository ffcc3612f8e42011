"""Low-level array ops shared by every branch kind: conv, BN-value padding, average pool.

A leaf module: it imports nothing from `rep/`, so any other module may use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NO_PAD = ((0, 0), (0, 0))


def conv2d(x, kernel, stride=1, padding=NO_PAD, groups=1):
    """NHWC x HWIO convolution in the dtype of `x`."""
    return jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def pad_with_values(y, pad: int, values):
    """Pad H and W of NHWC `y` by `pad` pixels filled with per-channel `values`."""
    if pad == 0:
        return y
    n, h, w, c = y.shape
    out = jnp.broadcast_to(values.astype(y.dtype), (n, h + 2 * pad, w + 2 * pad, c))
    return jax.lax.dynamic_update_slice(out, y, (0, pad, pad, 0))


def avg_pool(x, k: int, stride: int, pad: int):
    """k x k average pool counting zero padding (PyTorch's count_include_pad=True)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)  # float64 stays float64
    summed = jax.lax.reduce_window(
        x.astype(acc),
        0.0,
        jax.lax.add,
        (1, k, k, 1),
        (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )
    return (summed / (k * k)).astype(x.dtype)


def is_block(params) -> bool:
    """A slot's params hold a block (branches) rather than one plain kernel."""
    return "kxk" in params
