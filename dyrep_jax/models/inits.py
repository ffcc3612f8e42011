"""Initializers as the reference's model files set them.

- "goog" (the reference's VGG-16 for CIFAR and its MobileNetV1): conv
  N(0, sqrt(2 / (k*k*out))), BN 1/0, Linear U(-1/sqrt(out), 1/sqrt(out)), bias 0.
- "torch" (torchvision ResNet): conv kaiming_normal fan_out (the same normal as
  goog), BN 1/0, Linear left at PyTorch's default: weight and bias
  U(-1/sqrt(in), 1/sqrt(in)).
- "timm" (timm ByobNet / RepVggBlock, the reference's RepVGG): conv
  N(0, sqrt(2 / (k*k*out/groups))), every BN inside a RepVggBlock gamma
  N(0.1, 0.1) and beta N(0, 0.1), Linear N(0, 0.01), bias 0.

`torch_default_uniform` is PyTorch's default for a freshly built conv or
Linear (kaiming_uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
which the static DBB baseline's new blocks start from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DENSE_STYLES = ("goog", "torch", "timm")


def uniform(bound: float):
    """U(-bound, bound)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal(mean: float, std: float):
    """N(mean, std^2)."""

    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


def zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


def dense_inits(style: str, fan_in: int, fan_out: int):
    """(kernel_init, bias_init) of a Linear layer in the named style."""
    if style == "goog":
        return uniform(1.0 / np.sqrt(fan_out)), zeros
    if style == "torch":
        bound = 1.0 / np.sqrt(fan_in)
        return uniform(bound), uniform(bound)
    if style == "timm":
        return normal(0.0, 0.01), zeros
    raise ValueError(f"unknown init style '{style}' (valid: {', '.join(DENSE_STYLES)})")


def grouped_fan_out_normal(groups: int):
    """timm's conv init: N(0, sqrt(2 / fan_out)) with fan_out = kh*kw*out // groups (HWIO)."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        std = np.sqrt(2.0 / (kh * kw * out // groups))
        return std * jax.random.normal(key, shape, dtype)

    return init


TIMM_BN_SCALE = normal(0.1, 0.1)  # RepVggBlock.init_weights: every BN of the block
TIMM_BN_BIAS = normal(0.0, 0.1)


def torch_default_uniform(key, kernel_shape, dtype=jnp.float32):
    """(kernel, bias) of a fresh PyTorch conv with HWIO `kernel_shape`: U(+-1/sqrt(fan_in))."""
    fan_in = int(np.prod(kernel_shape[:-1]))  # kh * kw * in_channels / groups
    bound = 1.0 / np.sqrt(fan_in)
    k_kernel, k_bias = jax.random.split(key)
    return (jax.random.uniform(k_kernel, kernel_shape, dtype, -bound, bound),
            jax.random.uniform(k_bias, kernel_shape[-1:], dtype, -bound, bound))
