"""What the model knows but the params do not: each slot's geometry and input.

Both come from running the model with a flax method interceptor that watches
`RepConv.__call__`: geometry under `jax.eval_shape` (no compute), slot inputs
in inference mode (for BN calibration of a newly grown block).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from dyrep_jax.rep.module import RepConv


class SlotInfo(tuple):
    """(geometry, input_shape) of one top-level slot."""

    __slots__ = ()

    def __new__(cls, geometry, input_shape):
        return super().__new__(cls, (geometry, tuple(input_shape)))

    @property
    def geometry(self):
        return self[0]

    @property
    def input_shape(self):
        return self[1]


def _watch_slots(record):
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, RepConv) and context.method_name == "__call__":
            record(tuple(module.scope.path), module, args[0])
        return next_fun(*args, **kwargs)

    return interceptor


def slot_geometries(model, variables, x, **apply_kwargs) -> dict:
    """{slot path: SlotInfo} for every RepConv, from shapes only."""
    found = {}

    def record(path, module, inp):
        found[path] = SlotInfo(module.geometry(inp.shape[-1]), inp.shape)

    def run(v, xx):
        with nn.intercept_methods(_watch_slots(record)):
            return model.apply(v, xx, train=False, **apply_kwargs)

    jax.eval_shape(run, variables, x)
    return found


def capture_slot_inputs(model, variables, x, paths, **apply_kwargs) -> dict:
    """{path: input array} of the named slots, network in inference mode."""
    wanted = {tuple(p) for p in paths}
    found = {}

    def record(path, module, inp):
        if path in wanted:
            found[path] = inp

    with nn.intercept_methods(_watch_slots(record)):
        model.apply(variables, x, train=False, **apply_kwargs)
    return found
