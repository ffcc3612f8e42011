"""Conv geometry and the rules that decide which branches a conv may grow.

The parameter pytree of a slot tells *what* it holds; the geometry (channels,
kernel, stride, padding, groups) is fixed by the model and decides *which*
branches are legal. Keeping the rules here lets grow, cut and the controller
agree on one answer.
"""

from __future__ import annotations

from typing import NamedTuple

from dyrep_jax.rep.branches import (
    BRANCH_NAMES,  # order of the reference code's 0/1 `branches` vector
    KINDS,
    NESTABLE,
    PADDING_FREE_BRANCHES,  # allowed when padding != k // 2: exact at the borders
    child_geometry_of,
)

__all__ = ["BRANCH_NAMES", "MAX_NESTING", "NESTABLE", "PADDING_FREE_BRANCHES", "ConvGeometry",
           "RepError", "allowed_branches", "branch_refusal", "check_branches", "check_geometry",
           "child_geometry", "describe"]

MAX_NESTING = 2


class ConvGeometry(NamedTuple):
    """Static description of one conv slot (what a `RepConv` was built with)."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None  # None means k // 2 ("same" for odd k)
    groups: int = 1

    @property
    def pad(self) -> int:
        return self.kernel_size // 2 if self.padding is None else self.padding

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1


class RepError(ValueError):
    """A structural request the geometry or the slot cannot honour."""


def describe(path) -> str:
    if path is None or path == ():
        return "<slot>"
    if isinstance(path, str):
        return path
    return ".".join(str(p) for p in path)


def check_geometry(geom: ConvGeometry, path=None) -> None:
    where = describe(path)
    if geom.in_channels % geom.groups or geom.out_channels % geom.groups:
        raise RepError(
            f"{where}: groups={geom.groups} must divide in_channels={geom.in_channels} "
            f"and out_channels={geom.out_channels}"
        )
    if geom.stride < 1:
        raise RepError(f"{where}: stride must be >= 1, got {geom.stride}")
    if geom.pad < 0 or geom.pad > geom.kernel_size // 2:
        raise RepError(
            f"{where}: padding {geom.pad} must lie in [0, k//2={geom.kernel_size // 2}]"
        )


def branch_refusal(geom: ConvGeometry, branch: str) -> str | None:
    """Why `branch` is not allowed for `geom`, or None when it is."""
    if branch not in BRANCH_NAMES:
        return f"unknown branch (valid: {', '.join(BRANCH_NAMES)})"
    k = geom.kernel_size
    if k % 2 == 0:
        return f"kernel size {k} is even; re-parameterization needs an odd kernel"
    if geom.pad != k // 2 and branch not in PADDING_FREE_BRANCHES:
        return (
            f"padding {geom.pad} != k//2={k // 2} allows only "
            f"{', '.join(PADDING_FREE_BRANCHES)}"
        )
    return KINDS[branch].refusal(geom)


def allowed_branches(geom: ConvGeometry) -> tuple[str, ...]:
    """Every branch the geometry allows, in reference order."""
    return tuple(b for b in BRANCH_NAMES if branch_refusal(geom, b) is None)


def check_branches(geom: ConvGeometry, branches, path=None) -> tuple[str, ...]:
    """Validate a branch list; return it in reference order. kxk is always included."""
    branches = tuple(branches)
    where = describe(path)
    for b in branches:
        reason = branch_refusal(geom, b)
        if reason is not None:
            raise RepError(f"{where}: branch '{b}' not allowed: {reason}")
    if len(set(branches)) != len(branches):
        raise RepError(f"{where}: duplicate branches in {list(branches)}")
    chosen = set(branches) | {"kxk"}
    return tuple(b for b in BRANCH_NAMES if b in chosen)


def child_geometry(geom: ConvGeometry, branch: str) -> ConvGeometry:
    """Geometry of the conv inside `branch` that may itself be a slot (nesting)."""
    if branch not in NESTABLE:
        raise RepError(f"branch '{branch}' holds no nestable conv (only "
                       f"{' and '.join(NESTABLE)} do)")
    return child_geometry_of(geom, branch)
