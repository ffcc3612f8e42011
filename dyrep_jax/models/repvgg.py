"""RepVGG as timm's `RepVggBlock` builds it (the reference trains RepVGG with timm).

A training block is `conv_kxk` (3x3 conv slot + BN) + `conv_1x1` (1x1 conv
slot + BN) + `identity` (a BN on the input, when shapes allow), then ReLU.
These three branches are fixed parts of the block: only the 3x3 slot of
`conv_kxk` is a DyRep target (it may grow and nest twice); the 1x1 slot is
never eligible (kernel 1) and the identity BN is no slot at all, so Dep never
cuts them. `deploy=True` gives the plain network: one 3x3 conv with bias per
block, named `conv` (what `fuse_network` produces).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from dyrep_jax.models.inits import TIMM_BN_BIAS, TIMM_BN_SCALE, grouped_fan_out_normal
from dyrep_jax.models.layers import (
    ConvBN,
    bn_after,
    check_images,
    classifier,
    global_avg_pool,
    round_channels,
)
from dyrep_jax.models.norm import GroupBatchNorm
from dyrep_jax.rep import RepConv

# RepVGG's groupwise layers: indices 2, 4, ..., 26 counting the stem block as 0
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


class RepVGGConfig(NamedTuple):
    depths: tuple  # blocks in stages 1-4 (stage 0 is one block)
    multipliers: tuple  # (a, b): widths 64a, 128a, 256a, 512b; stem min(64, 64a)
    groups: int = 1  # groups of the groupwise layers


A_DEPTHS = (2, 4, 14, 1)
B_DEPTHS = (4, 6, 16, 1)
REPVGG_CONFIGS = {
    "repvgg_a0": RepVGGConfig(A_DEPTHS, (0.75, 2.5)),
    "repvgg_a1": RepVGGConfig(A_DEPTHS, (1.0, 2.5)),
    "repvgg_a2": RepVGGConfig(A_DEPTHS, (1.5, 2.75)),
    "repvgg_b0": RepVGGConfig(B_DEPTHS, (1.0, 2.5)),
    "repvgg_b1": RepVGGConfig(B_DEPTHS, (2.0, 4.0)),
    "repvgg_b1g2": RepVGGConfig(B_DEPTHS, (2.0, 4.0), 2),
    "repvgg_b1g4": RepVGGConfig(B_DEPTHS, (2.0, 4.0), 4),
    "repvgg_b2": RepVGGConfig(B_DEPTHS, (2.5, 5.0)),
    "repvgg_b2g4": RepVGGConfig(B_DEPTHS, (2.5, 5.0), 4),
    "repvgg_b3": RepVGGConfig(B_DEPTHS, (3.0, 5.0)),
}


class RepVGG(nn.Module):
    """RepVGG; modules `stage0`, `stage{s}_{j}` (`RepVGGBlock`), `fc`.

    The first block of every stage has stride 2. `with_bn_after_3x3=False`
    (static DBB baseline) drops the BN of each block's `conv_kxk`. Init as
    timm (`inits.py`, 'timm').
    """

    depths: tuple = A_DEPTHS
    multipliers: tuple = (0.75, 2.5)
    groupwise: int = 1
    num_classes: int = 1000
    width: float = 1.0
    dtype: Any = jnp.float32
    with_bn_after_3x3: bool = True
    deploy: bool = False
    bn_group_size: int = 0

    def stage_widths(self) -> tuple:
        a, b = self.multipliers
        widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        return tuple(round_channels(w, self.width) for w in widths)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, type(self).__name__)
        widths = self.stage_widths()
        unit = dict(with_bn_after_3x3=self.with_bn_after_3x3, deploy=self.deploy,
                    dtype=self.dtype, bn_group_size=self.bn_group_size)
        x = RepVGGBlock(widths[0], 2, 1, name="stage0", **unit)(x, train)
        layer = 1
        for stage, depth in enumerate(self.depths, start=1):
            for index in range(depth):
                groups = self.groupwise if layer in GROUPWISE_LAYERS else 1
                x = RepVGGBlock(widths[stage], 2 if index == 0 else 1, groups,
                                name=f"stage{stage}_{index}", **unit)(x, train)
                layer += 1
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, "timm")


class RepVGGBlock(nn.Module):
    """timm's RepVggBlock: relu(conv_kxk(x) + conv_1x1(x) + identity(x)); deploy: relu(conv(x))."""

    features: int
    strides: int = 1
    groups: int = 1
    with_bn_after_3x3: bool = True
    deploy: bool = False
    dtype: Any = jnp.float32
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy:
            conv = RepConv(self.features, 3, self.strides, None, self.groups, use_bias=True,
                           dtype=self.dtype, name="conv")
            return nn.relu(conv(x, train))
        unit = dict(strides=self.strides, groups=self.groups, dtype=self.dtype,
                    bn_group_size=self.bn_group_size,
                    kernel_init=grouped_fan_out_normal(self.groups),
                    bn_scale_init=TIMM_BN_SCALE, bn_bias_init=TIMM_BN_BIAS)
        y = ConvBN(self.features, 3, with_bn=bn_after(3, self.with_bn_after_3x3),
                   name="conv_kxk", **unit)(x, train)
        y = ConvBN(self.features, 1, name="conv_1x1", **unit)(x, train) + y
        if self.strides == 1 and x.shape[-1] == self.features:
            y = y + GroupBatchNorm(self.bn_group_size, TIMM_BN_SCALE, TIMM_BN_BIAS,
                                   name="identity")(x, train)
        return nn.relu(y)
