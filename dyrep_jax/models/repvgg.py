"""RepVGG: a plain stack of 3x3 slots, trained as kxk + 1x1 + identity blocks.

The model code only builds plain `ConvBN(with_bn=False)` slots; the training
form comes from growing each slot at init (`training_branches`), so the same
module serves training (blocks) and deployment (`deploy=True`, plain convs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from dyrep_jax.models.layers import (
    ConvBN,
    check_images,
    classifier,
    global_avg_pool,
    round_channels,
)
from dyrep_jax.rep import allowed_branches

REPVGG_BRANCHES = ("kxk", "1x1", "id")
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


def training_branches(path, geometry):
    """RepVGG's training form for any slot: kxk + 1x1 + id, where the geometry allows."""
    del path
    allowed = allowed_branches(geometry)
    return tuple(b for b in REPVGG_BRANCHES if b in allowed)


training_branches.last_gamma = 1.0  # RepVGG initializes every branch's BN at gamma 1


class RepVGG(nn.Module):
    """RepVGG; modules `stage0`, `stage{s}_{j}` (ConvBN, no BN), `fc`.

    Each block is ConvBN(with_bn=False) -> ReLU; the first block of every
    stage has stride 2. BN lives inside the grown block branches, so
    `with_bn_after_3x3` has no effect here.
    """

    depths: tuple = A_DEPTHS
    multipliers: tuple = (0.75, 2.5)
    groupwise: int = 1
    num_classes: int = 1000
    width: float = 1.0
    dtype: Any = jnp.float32
    with_bn_after_3x3: bool = True
    deploy: bool = False

    def stage_widths(self) -> tuple:
        a, b = self.multipliers
        widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        return tuple(round_channels(w, self.width) for w in widths)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x, type(self).__name__)
        widths = self.stage_widths()
        unit = dict(deploy=self.deploy, dtype=self.dtype)
        x = repvgg_block(widths[0], 2, 1, "stage0", unit, x, train)
        layer = 1
        for stage, depth in enumerate(self.depths, start=1):
            for index in range(depth):
                groups = self.groupwise if layer in GROUPWISE_LAYERS else 1
                x = repvgg_block(widths[stage], 2 if index == 0 else 1, groups,
                                 f"stage{stage}_{index}", unit, x, train)
                layer += 1
        return classifier(global_avg_pool(x), self.num_classes, self.dtype)


def repvgg_block(features, strides, groups, name, unit, x, train):
    """One RepVGG block: a BN-less 3x3 slot (grown into branches at init), then ReLU."""
    conv = ConvBN(features, 3, strides, groups, with_bn=False, name=name, **unit)
    return nn.relu(conv(x, train))
