"""The network's own BatchNorm, with optional ghost batches.

The reference trains ImageNet on 8 GPUs with plain (not synchronized) BN, so
each BN sees the batch statistics of the 32 images on its GPU. `group_size=N`
does the same on any device layout: in training the batch is split into
consecutive groups of N images and each group is normalized with its own
mean and variance. The running statistics move towards the average over the
groups of their (mean, unbiased variance): the expectation of what one GPU's
BN accumulates, with less noise. `group_size=0` uses the whole batch.

Parameter and statistic names (`scale`, `bias`, `mean`, `var`), momentum and
eps are those of `dyrep_jax.rep.bn`, so fusion, recalibration and the
PyTorch tools treat both BNs alike.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from dyrep_jax.rep import RepError
from dyrep_jax.rep.bn import EPS, MOMENTUM, batch_norm


def ghost_groups(batch: int, group_size: int) -> int:
    """How many groups a training batch is split into (1: the whole batch)."""
    if group_size <= 0 or batch <= group_size:
        return 1
    if batch % group_size:
        raise RepError(f"a training batch of {batch} images is not a multiple of "
                       f"model.bn_group_size={group_size}; change one of them")
    return batch // group_size


def ghost_batch_norm(params, stats, x, groups: int, momentum=MOMENTUM, eps=EPS):
    """Training-mode BN with statistics per group of `x.shape[0] // groups` images.

    Returns (y, new_stats) like `rep.bn.batch_norm`.
    """
    xf = x.astype(jnp.float32).reshape(groups, -1, *x.shape[1:])
    axes = tuple(range(1, xf.ndim - 1))
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    y = (xf - mean) * (params["scale"] / jnp.sqrt(var + eps)) + params["bias"]
    n = xf[0].size // x.shape[-1]
    unbiased = var * (n / max(n - 1, 1))
    c = x.shape[-1]
    new_stats = {
        "mean": (1.0 - momentum) * stats["mean"] + momentum * mean.reshape(groups, c).mean(0),
        "var": (1.0 - momentum) * stats["var"] + momentum * unbiased.reshape(groups, c).mean(0),
    }
    return y.reshape(x.shape).astype(x.dtype), new_stats


class GroupBatchNorm(nn.Module):
    """Per-channel BN over NHWC/NC inputs; PyTorch momentum and eps; optional ghost batches."""

    group_size: int = 0  # images per BN group in training; 0 = the whole batch
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    momentum: float = MOMENTUM
    epsilon: float = EPS

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        params = {"scale": self.param("scale", self.scale_init, (c,), jnp.float32),
                  "bias": self.param("bias", self.bias_init, (c,), jnp.float32)}
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        stats = {"mean": mean.value, "var": var.value}
        if not train or self.is_initializing():
            return batch_norm(params, stats, x, False, self.momentum, self.epsilon)[0]
        groups = ghost_groups(x.shape[0], self.group_size)
        if groups == 1:
            y, new, _ = batch_norm(params, stats, x, True, self.momentum, self.epsilon)
        else:
            y, new = ghost_batch_norm(params, stats, x, groups, self.momentum, self.epsilon)
        if self.is_mutable_collection("batch_stats"):
            mean.value, var.value = new["mean"], new["var"]
        return y
