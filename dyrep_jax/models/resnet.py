"""ResNets in torchvision's layout (and the CIFAR variant with a 3x3 stem)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dyrep_jax.models.layers import (
    ConvBN,
    bn_after,
    check_images,
    classifier,
    global_avg_pool,
    round_channels,
)


class BasicBlock(nn.Module):
    """Two 3x3 ConvBN units with a residual; 1x1 ConvBN downsample on shape change."""

    planes: int
    strides: int = 1
    dtype: Any = jnp.float32
    with_bn_after_3x3: bool = True
    deploy: bool = False
    bn_group_size: int = 0
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn3 = bn_after(3, self.with_bn_after_3x3)
        unit = dict(deploy=self.deploy, dtype=self.dtype, bn_group_size=self.bn_group_size)
        y = ConvBN(self.planes, 3, self.strides, with_bn=bn3, name="conv1", **unit)(x, train)
        y = ConvBN(self.planes, 3, with_bn=bn3, name="conv2", **unit)(nn.relu(y), train)
        return nn.relu(y + shortcut(self, x, self.planes, train))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, as torchvision) -> 1x1 x4, with a residual."""

    planes: int
    strides: int = 1
    dtype: Any = jnp.float32
    with_bn_after_3x3: bool = True
    deploy: bool = False
    bn_group_size: int = 0
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = self.planes * self.expansion
        unit = dict(deploy=self.deploy, dtype=self.dtype, bn_group_size=self.bn_group_size)
        y = ConvBN(self.planes, 1, name="conv1", **unit)(x, train)
        y = ConvBN(self.planes, 3, self.strides, with_bn=bn_after(3, self.with_bn_after_3x3),
                   name="conv2", **unit)(nn.relu(y), train)
        y = ConvBN(out, 1, name="conv3", **unit)(nn.relu(y), train)
        return nn.relu(y + shortcut(self, x, out, train))


def shortcut(block, x, out_channels: int, train: bool):
    """Identity, or a strided 1x1 ConvBN named `downsample` when the shape changes."""
    if block.strides == 1 and x.shape[-1] == out_channels:
        return x
    return ConvBN(out_channels, 1, block.strides, deploy=block.deploy, dtype=block.dtype,
                  bn_group_size=block.bn_group_size, name="downsample")(x, train)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet; `cifar_stem` swaps the 7x7/2 stem + max-pool for one 3x3/1 conv.

    Modules: `conv1` (stem), `layer{i}_{j}` blocks (ConvBN units `conv1`,
    `conv2`, `conv3`, `downsample`), `fc`. Init as torchvision (`inits.py`,
    'torch'): convs kaiming normal fan_out, BN 1/0, `fc` PyTorch's default.
    """

    layers: tuple = (2, 2, 2, 2)
    block: str = "basic"
    cifar_stem: bool = False
    num_classes: int = 1000
    width: float = 1.0
    dtype: Any = jnp.float32
    with_bn_after_3x3: bool = True
    deploy: bool = False
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, type(self).__name__)
        stem = round_channels(64, self.width)
        unit = dict(deploy=self.deploy, dtype=self.dtype, bn_group_size=self.bn_group_size)
        if self.cifar_stem:
            x = ConvBN(stem, 3, with_bn=bn_after(3, self.with_bn_after_3x3), name="conv1",
                       **unit)(x, train)
            x = nn.relu(x)
        else:
            x = nn.relu(ConvBN(stem, 7, 2, name="conv1", **unit)(x, train))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_cls = BLOCKS[self.block]
        for stage, depth in enumerate(self.layers):
            planes = round_channels(64 * 2**stage, self.width)
            for index in range(depth):
                strides = 2 if stage > 0 and index == 0 else 1
                x = block_cls(planes, strides, self.dtype, self.with_bn_after_3x3, self.deploy,
                              self.bn_group_size, name=f"layer{stage + 1}_{index}")(x, train)
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, "torch")
