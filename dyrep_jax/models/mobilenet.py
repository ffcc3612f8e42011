"""MobileNet v1: a 3x3/2 stem then 13 depthwise-separable blocks."""

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

# (pointwise output channels, depthwise stride) of the 13 blocks
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                       (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNet v1 (width 1.0: 4.23M params, 569M MACs at 224, 1000 classes).

    Modules: `stem`, `block{i}` each with ConvBN units `dw` (depthwise 3x3,
    groups = channels) and `pw` (pointwise 1x1), `fc`. Init as the
    reference's model file ('goog', see `inits.py`).
    """

    num_classes: int = 1000
    width: float = 1.0
    dtype: Any = jnp.float32
    with_bn_after_3x3: bool = True
    deploy: bool = False
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, type(self).__name__)
        bn3 = bn_after(3, self.with_bn_after_3x3)
        unit = dict(deploy=self.deploy, dtype=self.dtype, bn_group_size=self.bn_group_size)
        x = ConvBN(round_channels(32, self.width), 3, 2, with_bn=bn3, name="stem", **unit)(x, train)
        x = nn.relu(x)
        for index, (channels, strides) in enumerate(MOBILENET_V1_BLOCKS):
            x = DepthwiseSeparable(round_channels(channels, self.width), strides, bn3,
                                   name=f"block{index}", **unit)(x, train)
        return classifier(global_avg_pool(x), self.num_classes, self.dtype, "goog")


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 ConvBN + ReLU, then pointwise 1x1 ConvBN + ReLU."""

    features: int
    strides: int = 1
    bn_after_depthwise: bool = True
    deploy: bool = False
    dtype: Any = jnp.float32
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        unit = dict(deploy=self.deploy, dtype=self.dtype, bn_group_size=self.bn_group_size)
        channels = x.shape[-1]
        x = ConvBN(channels, 3, self.strides, groups=channels, with_bn=self.bn_after_depthwise,
                   name="dw", **unit)(x, train)
        x = ConvBN(self.features, 1, name="pw", **unit)(nn.relu(x), train)
        return nn.relu(x)
