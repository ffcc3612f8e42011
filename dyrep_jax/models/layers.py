"""Building blocks shared by every architecture.

Every conv of every model is a `ConvBN`: a `RepConv` slot named `conv`
followed (optionally) by a `BatchNorm` named `bn`. That single naming
convention is what lets `fuse_network` fold a whole network generically.
Initializers follow the reference's model files (see `inits.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dyrep_jax.models.inits import dense_inits
from dyrep_jax.models.norm import GroupBatchNorm
from dyrep_jax.rep import RepConv, RepError
from dyrep_jax.rep.module import conv_kernel_init


class ConvBN(nn.Module):
    """conv slot -> BN; activation is left to the caller.

    `with_bn=False` (static DBB) and `deploy=True` (BN already folded in) both
    drop `bn` and give the conv a bias so it stays affine-complete.
    `bn_group_size` > 0: the BN takes batch statistics over groups of that
    many images (ghost BN, as per-GPU BN in the reference).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    groups: int = 1
    padding: int | None = None
    with_bn: bool = True
    deploy: bool = False
    dtype: Any = jnp.float32
    bn_group_size: int = 0
    kernel_init: Callable = conv_kernel_init
    bn_scale_init: Callable = nn.initializers.ones
    bn_bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, train: bool = False):
        has_bn = self.with_bn and not self.deploy
        y = RepConv(self.features, self.kernel_size, self.strides, self.padding, self.groups,
                    use_bias=not has_bn, dtype=self.dtype, kernel_init=self.kernel_init,
                    name="conv")(x, train)
        if has_bn:
            y = GroupBatchNorm(self.bn_group_size, self.bn_scale_init, self.bn_bias_init,
                               name="bn")(y, train)
        return y


def round_channels(channels: int, width: float, multiple: int = 4) -> int:
    """`channels * width` rounded to a multiple of `multiple` (at least `multiple`).

    A multiple of 4 keeps RepVGG's 2- and 4-group convs valid at any width,
    while every published width (all multiples of 4) is left unchanged at 1.0.
    """
    if width == 1.0:
        return channels
    return max(multiple, int(round(channels * width / multiple)) * multiple)


def check_images(x, model_name: str) -> None:
    """Fail early, by model name, when the input is not an NHWC image batch."""
    if getattr(x, "ndim", None) != 4:
        raise RepError(
            f"{model_name}: expected a batch of images shaped (batch, height, width, channels), "
            f"got shape {getattr(x, 'shape', None)}; add a batch axis for a single image"
        )


def dense(x, features: int, dtype, name: str, init: str):
    """A Dense layer in the compute dtype, initialized in the named style (`inits.py`)."""
    kernel_init, bias_init = dense_inits(init, x.shape[-1], features)
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                    bias_init=bias_init, name=name)(x)


def classifier(features, num_classes: int, dtype, init: str, name: str = "fc"):
    """Dense head in the compute dtype, returning float32 logits."""
    return dense(features, num_classes, dtype, name, init).astype(jnp.float32)


def global_avg_pool(x):
    """Mean over H and W, accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def bn_after(kernel_size: int, with_bn_after_3x3: bool) -> bool:
    """Whether a conv of this size keeps its BN (the static DBB baseline drops it on 3x3)."""
    return with_bn_after_3x3 or kernel_size != 3
