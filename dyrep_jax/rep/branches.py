"""The table of branch kinds: everything the code knows about one kind, in one record.

A block is {kind name: branch params}; its `kxk` branch is the main one. Each record says
how a kind is built (`init`), run (`forward`), folded into one kxk conv (`fuse`) and counted
(`macs`), which BN ends it (`last_bn`: its gamma is the branch's importance, and it is the
BN a Dep cut or a grow reads), which conv inside it may itself be a slot (`nested`), when a
geometry refuses it (`refusal`), and what the reference PyTorch code calls it. Adding a
kind means adding one record here (plus its tests, and the torch reader in
`tools/convert.py` if its inner torch names differ).

`forward(run, bp, x, geom)` gets a per-branch runner `run` (see `apply.BranchRun`) that does
the BNs (`run.bn(name, z) -> (y, c)`, c = BN(0) for BN-value padding), the kind's `head`
(its 1x1 conv of the block input + BN, which may share one conv with other kinds' heads:
`run.head() -> (y, c)`) and nested slots (`run.nested(name, z, geom)`), so this module
needs no forward or fusion machinery itself.
`fuse(bp, bs, k, in_per_group, eps, fuse_nested)` returns the (kernel kxk, bias) of the
branch in inference mode; `fuse_nested(params, stats)` fuses a nested slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dyrep_jax.rep.bn import init_bn
from dyrep_jax.rep.kernels import (
    avg_kernel,
    compose_1x1_kxk,
    fold_bn,
    identity_kernel,
    pad_to_kxk,
    zero_bias,
)
from dyrep_jax.rep.ops import avg_pool, conv2d, pad_with_values


class BranchKind(NamedTuple):
    name: str  # our name; the tuple order of KINDS is the reference's `branches` vector order
    last_bn: str  # the BN that ends the branch
    nested: str | None  # key of the conv that may itself be a slot (nesting), or None
    padding_free: bool  # exact at borders when padding != k // 2
    torch_name: str  # the reference's module name inside a DiverseBranchBlock
    init: Callable  # (key, geom, last_gamma) -> (params, stats)
    forward: Callable  # (run, bp, x, geom) -> y
    fuse: Callable  # (bp, bs, k, in_per_group, eps, fuse_nested) -> (kernel, bias)
    macs: Callable  # (bp, geom, in_hw, out_hw, slot_macs) -> int
    refusal: Callable = lambda geom: None  # geom -> reason the kind is not allowed, or None
    head: Callable = lambda bp, geom: None  # -> (conv, bn, stride) of its 1x1 conv of x, or None


def fan_out_normal(key, shape):
    """The reference's new-branch conv init: normal, std sqrt(2 / (kh * kw * out))."""
    kh, kw, _, out = shape
    return jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / (kh * kw * out))


def kernel_macs(kernel, hw) -> int:
    """A conv's MACs: each output pixel costs kh * kw * (cin / groups) * cout."""
    return int(np.prod(kernel.shape)) * hw[0] * hw[1]


def child_geometry_of(geom, name: str):
    """Geometry of the nested conv of kind `name` (1x1_kxk's conv2 runs unpadded)."""
    return geom._replace(padding=0) if name == "1x1_kxk" else geom


# --- kxk: conv (+bias; may be a block) -> bn -----------------------------------------------
def init_kxk(key, geom, last_gamma):
    """Zero conv + identity BN; grow sets the conv so the block keeps its function."""
    k, cin, cout = geom.kernel_size, geom.in_channels // geom.groups, geom.out_channels
    bn_p, bn_s = init_bn(cout)
    conv = {"kernel": jnp.zeros((k, k, cin, cout), jnp.float32), "bias": jnp.zeros((cout,))}
    return {"conv": conv, "bn": bn_p}, {"bn": bn_s}


def forward_kxk(run, bp, x, geom):
    return run.bn("bn", run.nested("conv", x, geom))[0]


def fuse_kxk(bp, bs, k, in_per_group, eps, fuse_nested):
    inner = fuse_nested(bp["conv"], bs.get("conv"))
    return fold_bn(inner["kernel"], inner["bias"], bp["bn"], bs["bn"], eps)


def macs_kxk(bp, geom, in_hw, out_hw, slot_macs):
    return slot_macs(bp["conv"], geom, in_hw)


# --- 1x1, 1xk, kx1: one bias-free conv -> bn -----------------------------------------------
def conv_bn_kind(name: str, shape_of, pads_of, refusal=lambda geom: None) -> BranchKind:
    """One conv of shape `shape_of(k)` then a BN; padding `pads_of(k, p)`, or None for a 1x1
    of the block input (which may share one conv with the other such 1x1s)."""

    def init(key, geom, last_gamma):
        bn_p, bn_s = init_bn(geom.out_channels, last_gamma)
        shape = (*shape_of(geom.kernel_size), geom.in_channels // geom.groups, geom.out_channels)
        k1, _ = jax.random.split(key)
        return {"conv": {"kernel": fan_out_normal(k1, shape)}, "bn": bn_p}, {"bn": bn_s}

    def forward(run, bp, x, geom):
        if pads_of is None:
            return run.head()[0]
        pads = pads_of(geom.kernel_size, geom.pad)
        return run.bn("bn", conv2d(x, bp["conv"]["kernel"], geom.stride, pads, geom.groups))[0]

    def fuse(bp, bs, k, in_per_group, eps, fuse_nested):
        kern = bp["conv"]["kernel"]
        kern, bias = fold_bn(kern, zero_bias(kern), bp["bn"], bs["bn"], eps)
        return pad_to_kxk(kern, k), bias

    def macs(bp, geom, in_hw, out_hw, slot_macs):
        return kernel_macs(bp["conv"]["kernel"], out_hw)

    def head(bp, geom):
        return ("conv", "bn", geom.stride) if pads_of is None else None

    return BranchKind(name, "bn", None, False, f"dbb_{name}", init, forward, fuse, macs, refusal,
                      head)


def needs_k_above_1(geom):
    return "asymmetric branches need kernel size > 1" if geom.kernel_size == 1 else None


# --- 1x1_kxk: conv1 1x1 -> bn1 (BN-value padding) -> conv2 kxk (may be a block) -> bn2 ----
def init_1x1_kxk(key, geom, last_gamma):
    k, g, cin, cout = geom.kernel_size, geom.groups, geom.in_channels, geom.out_channels
    k1, k2 = jax.random.split(key)
    bn1_p, bn1_s = init_bn(cin)  # internal width = input channels
    bn2_p, bn2_s = init_bn(cout, last_gamma)
    params = {"conv1": {"kernel": fan_out_normal(k1, (1, 1, cin // g, cin))}, "bn1": bn1_p,
              "conv2": {"kernel": fan_out_normal(k2, (k, k, cin // g, cout))}, "bn2": bn2_p}
    return params, {"bn1": bn1_s, "bn2": bn2_s}


def forward_1x1_kxk(run, bp, x, geom):
    z, c = run.head()
    z = run.nested("conv2", pad_with_values(z, geom.pad, c), child_geometry_of(geom, "1x1_kxk"))
    return run.bn("bn2", z)[0]


def fuse_1x1_kxk(bp, bs, k, in_per_group, eps, fuse_nested):
    k1 = bp["conv1"]["kernel"]
    k1, b1 = fold_bn(k1, zero_bias(k1), bp["bn1"], bs["bn1"], eps)
    inner = fuse_nested(bp["conv2"], bs.get("conv2"))
    kern, bias = compose_1x1_kxk(k1, b1, inner["kernel"], inner["bias"])
    return fold_bn(kern, bias, bp["bn2"], bs["bn2"], eps)


def macs_1x1_kxk(bp, geom, in_hw, out_hw, slot_macs):
    """The 1x1 runs at input resolution; the kxk on its BN-padded output."""
    padded = tuple(n + 2 * geom.pad for n in in_hw)
    child = child_geometry_of(geom, "1x1_kxk")
    return kernel_macs(bp["conv1"]["kernel"], in_hw) + slot_macs(bp["conv2"], child, padded)


# --- 1x1_avg: [conv 1x1 -> bn (BN-value padding)] -> avg pool -> avgbn ---------------------
def init_1x1_avg(key, geom, last_gamma):
    """A depthwise conv has no 1x1 conv here (the reference's groups == out_channels case)."""
    cout = geom.out_channels
    avg_p, avg_s = init_bn(cout, last_gamma)
    if geom.is_depthwise:
        return {"avgbn": avg_p}, {"avgbn": avg_s}
    bn_p, bn_s = init_bn(cout)
    k1, _ = jax.random.split(key)
    kern = fan_out_normal(k1, (1, 1, geom.in_channels // geom.groups, cout))
    return {"conv": {"kernel": kern}, "bn": bn_p, "avgbn": avg_p}, {"bn": bn_s, "avgbn": avg_s}


def forward_1x1_avg(run, bp, x, geom):
    k, s, p = geom.kernel_size, geom.stride, geom.pad
    if "conv" in bp:
        z, c = run.head()
        z = avg_pool(pad_with_values(z, p, c), k, s, 0)
    else:  # pool the input directly: zero padding is exact
        z = avg_pool(x, k, s, p)
    return run.bn("avgbn", z)[0]


def fuse_1x1_avg(bp, bs, k, in_per_group, eps, fuse_nested):
    c = bp["avgbn"]["scale"].shape[0]
    dtype = bp["avgbn"]["scale"].dtype
    if "conv" in bp:
        k1 = bp["conv"]["kernel"]
        k1, b1 = fold_bn(k1, zero_bias(k1), bp["bn"], bs["bn"], eps)
        # the average pool is channel-diagonal, so groups do not matter for it
        kern, bias = compose_1x1_kxk(k1, b1, avg_kernel(k, c, dtype), jnp.zeros((c,), dtype))
    else:
        kern, bias = avg_kernel(k, c, dtype), jnp.zeros((c,), dtype)
    return fold_bn(kern, bias, bp["avgbn"], bs["avgbn"], eps)


def macs_1x1_avg(bp, geom, in_hw, out_hw, slot_macs):
    """The pool counts 0 MACs, as in the published figures."""
    return kernel_macs(bp["conv"]["kernel"], in_hw) if "conv" in bp else 0


# --- id: bn of the input --------------------------------------------------------------------
def init_id(key, geom, last_gamma):
    bn_p, bn_s = init_bn(geom.out_channels, last_gamma)
    return {"bn": bn_p}, {"bn": bn_s}


def forward_id(run, bp, x, geom):
    return run.bn("bn", x)[0]


def fuse_id(bp, bs, k, in_per_group, eps, fuse_nested):
    c = bp["bn"]["scale"].shape[0]
    dtype = bp["bn"]["scale"].dtype
    kern = identity_kernel(k, in_per_group, c, dtype)
    return fold_bn(kern, jnp.zeros((c,), dtype), bp["bn"], bs["bn"], eps)


def refuse_id(geom):
    if geom.in_channels != geom.out_channels or geom.stride != 1:
        return (f"identity needs in_channels == out_channels and stride 1 "
                f"(got {geom.in_channels}->{geom.out_channels}, stride {geom.stride})")
    return None


def no_macs(bp, geom, in_hw, out_hw, slot_macs):
    return 0


KINDS: dict[str, BranchKind] = {kind.name: kind for kind in (
    conv_bn_kind("1x1", lambda k: (1, 1), None),
    BranchKind("1x1_kxk", "bn2", "conv2", True, "dbb_1x1_kxk", init_1x1_kxk, forward_1x1_kxk,
               fuse_1x1_kxk, macs_1x1_kxk, head=lambda bp, geom: ("conv1", "bn1", 1)),
    BranchKind("1x1_avg", "avgbn", None, True, "dbb_1x1_avg", init_1x1_avg, forward_1x1_avg,
               fuse_1x1_avg, macs_1x1_avg,
               head=lambda bp, geom: ("conv", "bn", 1) if "conv" in bp else None),
    BranchKind("kxk", "bn", "conv", True, "dbb_kxk", init_kxk, forward_kxk, fuse_kxk, macs_kxk),
    conv_bn_kind("1xk", lambda k: (1, k), lambda k, p: ((p - k // 2,) * 2, (p, p)),
                 needs_k_above_1),
    conv_bn_kind("kx1", lambda k: (k, 1), lambda k, p: ((p, p), (p - k // 2,) * 2),
                 needs_k_above_1),
    BranchKind("id", "bn", None, False, "dbb_id", init_id, forward_id, fuse_id, no_macs,
               refuse_id),
)}
BRANCH_NAMES = tuple(KINDS)  # 1x1, 1x1_kxk, 1x1_avg, kxk, 1xk, kx1, id
LAST_BN = {name: kind.last_bn for name, kind in KINDS.items()}
NESTABLE = {name: kind.nested for name, kind in KINDS.items() if kind.nested}
PADDING_FREE_BRANCHES = tuple(name for name, kind in KINDS.items() if kind.padding_free)
TORCH_NAMES = {name: kind.torch_name for name, kind in KINDS.items()}
