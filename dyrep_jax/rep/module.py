"""Flax linen modules that hand their own variables to the pure rep functions.

`RepConv` creates a plain kernel at init; afterwards it reads whatever
sub-tree it holds (plain or block) and calls `apply_slot`. A structural change
therefore never touches model code: the parameter pytree is the structure.
`BatchNorm` is the network's own BN with PyTorch semantics (see `bn.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dyrep_jax.rep.apply import apply_slot
from dyrep_jax.rep.bn import EPS, MOMENTUM, batch_norm, init_bn
from dyrep_jax.rep.geometry import ConvGeometry, RepError
from dyrep_jax.rep.tree import to_plain_dict

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _module_path(module) -> str:
    return ".".join(module.scope.path) if module.scope is not None else module.name or "?"


class RepConv(nn.Module):
    """A conv slot: plain at init, any block structure afterwards."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | None = None  # None -> k // 2
    groups: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32  # compute dtype; params and BN stats stay float32
    kernel_init: Callable = conv_kernel_init  # of the plain kernel at init (a model's own rule)

    def geometry(self, in_channels: int) -> ConvGeometry:
        return ConvGeometry(in_channels, self.features, self.kernel_size, self.strides,
                            self.padding, self.groups)

    @nn.compact
    def __call__(self, x, train: bool = False, share_1x1: bool = True,
                 fuse_inference: bool = True):
        where = _module_path(self)
        if x.ndim != 4:
            raise RepError(f"{where}: expected NHWC input of rank 4, got shape {x.shape}")
        cin = x.shape[-1]
        if cin % self.groups:
            raise RepError(f"{where}: {cin} input channels not divisible by groups={self.groups}")
        k = self.kernel_size
        if self.is_initializing() and not self.has_variable("params", "kernel"):
            self.param("kernel", self.kernel_init, (k, k, cin // self.groups, self.features))
            if self.use_bias:
                self.param("bias", nn.initializers.zeros, (self.features,))
        if "params" not in self.variables:
            raise RepError(
                f"{where}: the variables hold no parameters for this conv slot; they do not "
                "match this model (check the model name, width and num_classes they were "
                "made with)")
        params = to_plain_dict(self.variables["params"])
        stats = to_plain_dict(self.variables.get("batch_stats", {}))
        expect = cin // self.groups
        got = _input_width(params)
        if got != expect:
            raise RepError(
                f"{where}: input has {cin} channels but the slot's kernel expects "
                f"{got * self.groups} (groups={self.groups})"
            )
        y, new_stats = apply_slot(params, stats, x.astype(self.dtype), self.geometry(cin), train,
                                  share_1x1=share_1x1, fuse_inference=fuse_inference)
        if train and self.is_mutable_collection("batch_stats"):
            for key, value in new_stats.items():
                self.put_variable("batch_stats", key, value)
        return y


@contextlib.contextmanager
def forward_options(share_1x1: bool = True, fuse_inference: bool = True):
    """Within this context (while tracing), every RepConv runs its block with these options.

    E.g. `forward_options(False, False)` runs the branchwise reference in a whole model
    (benchmarks, tests); outside it RepConv uses the defaults (both on).
    """

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, RepConv) and context.method_name == "__call__":
            kwargs = {**kwargs, "share_1x1": share_1x1, "fuse_inference": fuse_inference}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _input_width(params) -> int:
    while "kxk" in params:
        params = params["kxk"]["conv"]
    return params["kernel"].shape[2]


class BatchNorm(nn.Module):
    """Per-channel BN over NHWC/NC inputs; PyTorch momentum (0.1) and eps (1e-5)."""

    momentum: float = MOMENTUM
    epsilon: float = EPS
    scale_init_value: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False, share_1x1: bool = True,
                 fuse_inference: bool = True):
        c = x.shape[-1]
        init_p, init_s = init_bn(c, self.scale_init_value)
        scale = self.param("scale", lambda _k: init_p["scale"])
        bias = self.param("bias", lambda _k: init_p["bias"])
        mean = self.variable("batch_stats", "mean", lambda: init_s["mean"])
        var = self.variable("batch_stats", "var", lambda: init_s["var"])
        use_batch = train and not self.is_initializing()
        y, new, _ = batch_norm({"scale": scale, "bias": bias}, {"mean": mean.value, "var": var.value},
                               x, use_batch, self.momentum, self.epsilon)
        if use_batch and self.is_mutable_collection("batch_stats"):
            mean.value, var.value = new["mean"], new["var"]
        return y
