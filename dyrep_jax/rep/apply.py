"""Forward pass of a conv slot (plain or block) as a pure function: ONE block forward.

`apply_slot(params, stats, x, geom, train)` -> `(y, new_stats)`. A plain slot
holds `kernel` (HWIO) and maybe `bias`; a block holds one sub-tree per branch
(see `tree.py` for the layout; each kind's forward is in `branches.py`). Convs run
in the dtype of `x` (bf16 or f32); BN statistics stay float32.

Two switches make it cheaper without changing its results (to float rounding):
`fuse_inference` runs an inference-mode block as its fused conv (what deployment
runs), and `share_1x1` runs the 1x1 convs of the block input as one conv + one BN in
training (`share.py`). With both off every branch runs on its own: the reference
semantics, `apply_slot_branchwise`, the oracle of the tests.
"""

from __future__ import annotations

from typing import NamedTuple

from dyrep_jax.rep.bn import EPS, MOMENTUM, batch_norm
from dyrep_jax.rep.branches import BRANCH_NAMES, KINDS, NESTABLE
from dyrep_jax.rep.fuse import fuse_slot
from dyrep_jax.rep.geometry import ConvGeometry, child_geometry
from dyrep_jax.rep.ops import NO_PAD, avg_pool, conv2d, is_block, pad_with_values
from dyrep_jax.rep.share import shared_1x1

__all__ = ["ForwardOptions", "apply_block", "apply_block_branchwise", "apply_plain",
           "apply_slot", "apply_slot_branchwise", "avg_pool", "conv2d", "inner_slot_input",
           "is_block", "pad_with_values"]


class ForwardOptions(NamedTuple):
    train: bool
    momentum: float = MOMENTUM
    eps: float = EPS
    share_1x1: bool = True  # one conv + BN for the 1x1 convs of x (training)
    fuse_inference: bool = True  # an inference-mode block runs as its fused conv


def apply_plain(params, x, geom: ConvGeometry):
    """A plain slot: one conv (+ bias)."""
    p = geom.pad
    y = conv2d(x, params["kernel"], geom.stride, ((p, p), (p, p)), geom.groups)
    if "bias" in params:
        y = y + params["bias"].astype(y.dtype)
    return y


def apply_slot(params, stats, x, geom: ConvGeometry, train: bool, momentum: float = MOMENTUM,
               eps: float = EPS, *, share_1x1: bool = True, fuse_inference: bool = True):
    """Run one slot; returns (y, new_stats) with new_stats shaped like `stats`."""
    opts = ForwardOptions(train, momentum, eps, share_1x1, fuse_inference)
    return run_slot(params, stats, x, geom, opts)


def apply_slot_branchwise(params, stats, x, geom: ConvGeometry, train: bool,
                          momentum: float = MOMENTUM, eps: float = EPS):
    """`apply_slot` with every block (nested ones too) computed branch by branch."""
    return apply_slot(params, stats, x, geom, train, momentum, eps, share_1x1=False,
                      fuse_inference=False)


def run_slot(params, stats, x, geom: ConvGeometry, opts: ForwardOptions):
    if not is_block(params):
        return apply_plain(params, x, geom), stats
    return run_block(params, stats, x, geom, opts)


# Former names: a block is a slot, so the slot functions serve.
apply_block = apply_slot
apply_block_branchwise = apply_slot_branchwise


def check_block(params) -> None:
    unknown = set(params) - set(BRANCH_NAMES)
    if unknown:
        raise ValueError(f"unknown branch(es) {sorted(unknown)} in block params")


class BranchRun:
    """What a kind's `forward` may ask for: its BNs, its (maybe shared) head, nested slots."""

    def __init__(self, name, bp, bs, x, geom, opts, shared):
        self.name, self.bp, self.bs, self.x, self.geom, self.opts = name, bp, bs, x, geom, opts
        self.shared = shared  # (y, c) of this branch's head when it ran in a shared conv
        self.new_stats = {}

    def bn(self, name: str, z):
        o = self.opts
        y, st, (_, c) = batch_norm(self.bp[name], self.bs[name], z, o.train, o.momentum, o.eps)
        self.new_stats[name] = st
        return y, c

    def head(self):
        if self.shared is not None:
            return self.shared
        conv, bn, stride = KINDS[self.name].head(self.bp, self.geom)
        z = conv2d(self.x, self.bp[conv]["kernel"], stride, NO_PAD, self.geom.groups)
        return self.bn(bn, z)

    def nested(self, name: str, z, geom: ConvGeometry):
        z, inner = run_slot(self.bp[name], self.bs.get(name, {}), z, geom, self.opts)
        if name in self.bs:
            self.new_stats[name] = inner
        return z


def run_block(params, stats, x, geom: ConvGeometry, opts: ForwardOptions):
    check_block(params)
    if opts.fuse_inference and not opts.train:
        fused = fuse_slot(params, stats, opts.eps)
        return apply_plain(fused, x, geom), stats
    shared = run_shared_heads(params, stats, x, geom, opts)
    out, new_stats = None, {}
    for name in [b for b in BRANCH_NAMES if b in params]:  # reference order: same rounding
        head = shared[name][:2] if name in shared else None
        run = BranchRun(name, params[name], stats[name], x, geom, opts, head)
        y = KINDS[name].forward(run, params[name], x, geom)
        new_stats[name] = {**run.new_stats, **shared_stats(shared, name)}
        out = y if out is None else out + y
    return out, new_stats


def run_shared_heads(params, stats, x, geom: ConvGeometry, opts: ForwardOptions) -> dict:
    """{branch: (y, c, bn name, new bn stats)} of the heads run as one conv (training only)."""
    if not (opts.train and opts.share_1x1):
        return {}
    parts = []
    for name in [b for b in BRANCH_NAMES if b in params]:
        head = KINDS[name].head(params[name], geom)
        if head is not None and head[2] == 1:
            parts.append((name, head[0], head[1]))
    if len(parts) < 2:
        return {}
    results = shared_1x1(params, stats, x, geom.groups, parts, opts.momentum, opts.eps)
    return {name: (y, c, bn, st) for (name, _, bn), (y, st, c) in zip(parts, results, strict=True)}


def shared_stats(shared: dict, name: str) -> dict:
    if name not in shared:
        return {}
    _, _, bn, st = shared[name]
    return {bn: st}


class NestedInput(Exception):
    """Raised by `CaptureRun.nested` to stop a branch's forward at its nested slot."""

    def __init__(self, x, geom):
        super().__init__("nested slot input")
        self.x, self.geom = x, geom


class CaptureRun(BranchRun):
    """A BranchRun in inference mode that stops at the nested slot `target`."""

    def __init__(self, name, bp, bs, x, geom, eps, target):
        super().__init__(name, bp, bs, x, geom, ForwardOptions(False, eps=eps), None)
        self.target = target

    def nested(self, name, z, geom):
        if name == self.target:
            raise NestedInput(z, geom)
        return super().nested(name, z, geom)


def inner_slot_input(params, stats, x, geom: ConvGeometry, branches, eps: float = EPS):
    """Input seen by the slot nested at `branches` (e.g. ['kxk'] or ['1x1_kxk', 'kxk']).

    The enclosing blocks run in inference mode (e.g. `1x1_kxk` applies conv1 -> bn1 and
    pads with BN(0)), exactly as their forward does.
    """
    for branch in branches:
        if branch not in NESTABLE:
            child_geometry(geom, branch)  # raises the error that names the nestable kinds
        target = NESTABLE[branch]
        bp, bs = params[branch], stats.get(branch, {})
        run = CaptureRun(branch, bp, bs, x, geom, eps, target)
        try:
            KINDS[branch].forward(run, bp, x, geom)
        except NestedInput as found:
            x, geom = found.x, found.geom
        params, stats = bp[target], bs.get(target, {})
    return x
