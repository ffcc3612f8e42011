"""Batch norm as pure functions, with PyTorch's semantics.

Params hold `scale`/`bias`, batch_stats hold `mean`/`var`. Running statistics
follow PyTorch: `running = (1 - momentum) * running + momentum * batch` with the
*unbiased* batch variance, momentum 0.1, eps 1e-5, so that reference
checkpoints and recipes carry over unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp

EPS = 1e-5
MOMENTUM = 0.1


def init_bn(channels: int, gamma: float = 1.0):
    params = {
        "scale": jnp.full((channels,), gamma, jnp.float32),
        "bias": jnp.zeros((channels,), jnp.float32),
    }
    stats = {"mean": jnp.zeros((channels,), jnp.float32), "var": jnp.ones((channels,), jnp.float32)}
    return params, stats


def accumulation_dtype(x):
    """float32 for bf16/f32 inputs; float64 inputs (tests under jax_enable_x64) stay float64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def batch_moments(x):
    """Per-channel mean and biased variance over all but the last axis, in float32 (or more)."""
    xf = x.astype(accumulation_dtype(x))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    return mean, var


def bn_affine(params, mean, var, eps=EPS):
    """The per-channel (a, c) with BN(z) = a * z + c for the given statistics."""
    a = params["scale"] * jnp.reciprocal(jnp.sqrt(var + eps))
    return a, params["bias"] - mean * a


def batch_norm(params, stats, x, train: bool, momentum: float = MOMENTUM, eps: float = EPS):
    """Normalize `x` (NHWC or NC). Returns (y, new_stats, (a, c)).

    (a, c) is the affine map actually applied; BN-value padding needs it to pad
    with BN(0) = c under the same statistics used for normalization.
    """
    if train:
        mean, var = batch_moments(x)
        n = x.size // x.shape[-1]
        unbiased = var * (n / max(n - 1, 1))
        new_stats = {
            "mean": (1.0 - momentum) * stats["mean"] + momentum * mean,
            "var": (1.0 - momentum) * stats["var"] + momentum * unbiased,
        }
    else:
        mean, var = stats["mean"], stats["var"]
        new_stats = stats
    a, c = bn_affine(params, mean, var, eps)
    y = x.astype(accumulation_dtype(x)) * a + c
    return y.astype(x.dtype), new_stats, (a, c)
