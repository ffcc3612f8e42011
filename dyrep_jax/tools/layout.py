"""Which paths of our params tree are conv units and which are Dense layers.

Every model builds its convs as `ConvBN` (a slot named `conv`, maybe a `bn`)
and its linear layers as `nn.Dense` (a 2-d `kernel`). Walking a params tree
for those two shapes gives the layer list that import and export map by name,
without any per-architecture code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax

from dyrep_jax.models.variables import image_spec
from dyrep_jax.rep.tree import is_slot


class Layer(NamedTuple):
    kind: str  # "unit" (ConvBN) or "dense"
    path: tuple  # path of the unit / Dense module in the params tree
    has_bn: bool = False  # units only: whether a BN follows the conv


def layers_of(params, prefix: tuple = ()) -> list[Layer]:
    """Every ConvBN unit and Dense layer below `params`, in tree order."""
    out = []
    for key, node in params.items():
        path = (*prefix, key)
        if not isinstance(node, Mapping):
            continue
        if is_slot(node.get("conv")):
            out.append(Layer("unit", path, "bn" in node))
        elif len(getattr(node.get("kernel"), "shape", ())) == 2:
            out.append(Layer("dense", path))
        elif not is_slot(node):
            out.extend(layers_of(node, path))
    return out


def slot_out_channels(slot) -> int:
    """Output channels of a plain or (nested) block slot: its innermost kxk kernel's."""
    while "kxk" in slot:
        slot = slot["kxk"]["conv"]
    return int(slot["kernel"].shape[-1])


def in_call_order(layers: list[Layer], model, variables, image_shape) -> list[Layer]:
    """`layers` sorted by when the forward pass first calls them (trees come back sorted by
    name from orbax and `jax.eval_shape`, which puts `fc` before `layer1_0`)."""
    order: dict[tuple, int] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.scope is not None:
            order.setdefault(tuple(context.module.scope.path), len(order))
        return next_fun(*args, **kwargs)

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, train=False)

    jax.eval_shape(run, variables, image_spec(image_shape))
    return sorted(layers, key=lambda layer: order.get(layer.path, len(order)))
