"""Multiply-accumulate count of one forward pass of one image.

Counts every conv of every branch (nested blocks too) at the resolution it
runs at, plus Dense layers. BN, biases, activations, pooling and the average
pool inside `1x1_avg` count 0 MACs: after fusion they all vanish or are
negligible, and the published figures count the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dyrep_jax.models.variables import image_spec
from dyrep_jax.rep.branches import KINDS, kernel_macs
from dyrep_jax.rep.introspect import slot_geometries
from dyrep_jax.rep.tree import get_at, is_slot


def count_macs(model, variables, input_shape) -> int:
    """MACs for one image of `input_shape` (H, W, C) under `variables`' structure.

    Every branch of every (nested) block counts, each at its own resolution;
    the average pool of `1x1_avg`, BN and biases count 0.
    """
    params = variables["params"]
    total = 0
    for path, info in slot_geometries(model, variables, image_spec(input_shape)).items():
        slot = get_at(params, path)
        _, height, width, _ = info.input_shape
        total += slot_macs(slot, info.geometry, (height, width))
    return total + dense_macs(params)


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def slot_macs(slot, geom, in_hw) -> int:
    """MACs of a plain or (nested) block slot with input spatial size `in_hw`."""
    k, s, p = geom.kernel_size, geom.stride, geom.pad
    out_hw = tuple(conv_output_size(n, k, s, p) for n in in_hw)
    if "kxk" not in slot:
        return kernel_macs(slot["kernel"], out_hw)
    return sum(KINDS[branch].macs(bp, geom, in_hw, out_hw, slot_macs)
               for branch, bp in slot.items())


def dense_macs(params) -> int:
    """in * out for every Dense kernel (2-d) outside the conv slots."""
    total = 0
    for node in params.values():
        if not isinstance(node, Mapping) or is_slot(node):
            continue
        kernel = node.get("kernel")
        if kernel is not None and len(kernel.shape) == 2:
            total += int(np.prod(kernel.shape))
        else:
            total += dense_macs(node)
    return total
