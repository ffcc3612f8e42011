"""VGG-16 for CIFAR: 13 conv3x3-BN-ReLU, a 512-wide hidden Dense, a classifier."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dyrep_jax.models.layers import (
    ConvBN,
    bn_after,
    check_images,
    classifier,
    dense,
    round_channels,
)

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512)


class VGGCifar(nn.Module):
    """VGG-16 (CIFAR variant): 14.99M params and 313M MACs at 32x32, 10 classes.

    After the convs a 2x2 max-pool of stride 1 turns the 2x2 map of a 32x32
    input into 1x1 (its window shrinks for smaller maps), then flatten, Dense
    512 + ReLU, Dense classifier. The hidden width scales with `width` too.
    Init as the reference's NAS-style model ('goog', see `inits.py`).
    """

    num_classes: int = 10
    width: float = 1.0
    dtype: Any = jnp.float32
    with_bn_after_3x3: bool = True
    deploy: bool = False
    layout: tuple = VGG16_LAYOUT
    hidden: int = 512
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, type(self).__name__)
        index = 0
        for item in self.layout:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = ConvBN(round_channels(item, self.width), 3, with_bn=bn_after(3, self.with_bn_after_3x3),
                       deploy=self.deploy, dtype=self.dtype, bn_group_size=self.bn_group_size,
                       name=f"conv{index}")(x, train)
            x = nn.relu(x)
            index += 1
        window = (min(2, x.shape[1]), min(2, x.shape[2]))
        x = nn.max_pool(x, window, strides=(1, 1))
        x = x.reshape(x.shape[0], -1)
        hidden = round_channels(self.hidden, self.width)
        x = nn.relu(dense(x, hidden, self.dtype, "fc1", "goog"))
        return classifier(x, self.num_classes, self.dtype, "goog", name="fc2")
