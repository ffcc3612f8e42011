"""Forward pass of a conv slot (plain or block) as a pure function.

`apply_slot(params, stats, x, geom, train)` -> `(y, new_stats)`. A plain slot
holds `kernel` (HWIO) and maybe `bias`; a block holds one sub-tree per branch
(see `tree.py` for the layout). Convs run in the dtype of `x` (bf16 or f32);
BN statistics stay float32.

`apply_block_branchwise` is the definition: each branch on its own, as the
reference computes it. `apply_block` gives the same results with less work
(`fast.py`: the fused conv at inference, shared 1x1 conv + BN in training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dyrep_jax.rep.bn import EPS, MOMENTUM, batch_norm
from dyrep_jax.rep.geometry import BRANCH_NAMES, ConvGeometry, child_geometry


def conv2d(x, kernel, stride=1, padding=((0, 0), (0, 0)), groups=1):
    """NHWC x HWIO convolution in the dtype of `x`."""
    return jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def pad_with_values(y, pad: int, values):
    """Pad H and W of NHWC `y` by `pad` pixels filled with per-channel `values`."""
    if pad == 0:
        return y
    n, h, w, c = y.shape
    out = jnp.broadcast_to(values.astype(y.dtype), (n, h + 2 * pad, w + 2 * pad, c))
    return jax.lax.dynamic_update_slice(out, y, (0, pad, pad, 0))


def avg_pool(x, k: int, stride: int, pad: int):
    """k x k average pool counting zero padding (PyTorch's count_include_pad=True)."""
    summed = jax.lax.reduce_window(
        x.astype(jnp.float32),
        0.0,
        jax.lax.add,
        (1, k, k, 1),
        (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )
    return (summed / (k * k)).astype(x.dtype)


def is_block(params) -> bool:
    return "kxk" in params


def apply_plain(params, x, geom: ConvGeometry):
    """A plain slot: one conv (+ bias)."""
    p = geom.pad
    y = conv2d(x, params["kernel"], geom.stride, ((p, p), (p, p)), geom.groups)
    if "bias" in params:
        y = y + params["bias"].astype(y.dtype)
    return y


def apply_slot(params, stats, x, geom: ConvGeometry, train: bool, momentum: float = MOMENTUM,
               eps: float = EPS):
    """Run one slot; returns (y, new_stats) with new_stats shaped like `stats`."""
    if not is_block(params):
        return apply_plain(params, x, geom), stats
    return apply_block(params, stats, x, geom, train, momentum, eps)


def apply_slot_branchwise(params, stats, x, geom: ConvGeometry, train: bool,
                          momentum: float = MOMENTUM, eps: float = EPS):
    """`apply_slot` with every block (nested ones too) computed branch by branch."""
    if not is_block(params):
        return apply_plain(params, x, geom), stats
    return apply_block_branchwise(params, stats, x, geom, train, momentum, eps)


def check_block(params) -> None:
    unknown = set(params) - set(BRANCH_NAMES)
    if unknown:
        raise ValueError(f"unknown branch(es) {sorted(unknown)} in block params")


def apply_block(params, stats, x, geom: ConvGeometry, train: bool, momentum: float = MOMENTUM,
                eps: float = EPS):
    """A block's output; equal to `apply_block_branchwise` up to float rounding."""
    from dyrep_jax.rep import fast  # fast -> fuse -> apply: import at call time

    check_block(params)
    if train:
        return fast.train_block(params, stats, x, geom, momentum, eps)
    return fast.fused_block(params, stats, x, geom, eps)


def apply_block_branchwise(params, stats, x, geom: ConvGeometry, train: bool,
                           momentum: float = MOMENTUM, eps: float = EPS):
    """Every branch computed on its own: the reference semantics (and the tests' oracle)."""
    check_block(params)
    k, s, p, g = geom.kernel_size, geom.stride, geom.pad, geom.groups
    new_stats = {}
    out = None

    def bn(branch, name, z):
        y, st, affine = batch_norm(params[branch][name], stats[branch][name], z, train,
                                   momentum, eps)
        new_stats.setdefault(branch, {})[name] = st
        return y, affine

    for branch in [b for b in BRANCH_NAMES if b in params]:  # fixed order: same rounding
        bp = params[branch]
        if branch == "kxk":
            z, conv_stats = apply_slot_branchwise(bp["conv"], stats[branch].get("conv", {}), x,
                                                  geom, train, momentum, eps)
            y, _ = bn(branch, "bn", z)
            if "conv" in stats[branch]:
                new_stats[branch]["conv"] = conv_stats
        elif branch == "1x1":
            z = conv2d(x, bp["conv"]["kernel"], s, ((0, 0), (0, 0)), g)
            y, _ = bn(branch, "bn", z)
        elif branch == "1x1_kxk":
            z = conv2d(x, bp["conv1"]["kernel"], 1, ((0, 0), (0, 0)), g)
            z, (_, c) = bn(branch, "bn1", z)
            z = pad_with_values(z, p, c)
            z, conv_stats = apply_slot_branchwise(bp["conv2"], stats[branch].get("conv2", {}), z,
                                                  child_geometry(geom, "1x1_kxk"), train,
                                                  momentum, eps)
            y, _ = bn(branch, "bn2", z)
            if "conv2" in stats[branch]:
                new_stats[branch]["conv2"] = conv_stats
        elif branch == "1x1_avg":
            if "conv" in bp:
                z = conv2d(x, bp["conv"]["kernel"], 1, ((0, 0), (0, 0)), g)
                z, (_, c) = bn(branch, "bn", z)
                z = avg_pool(pad_with_values(z, p, c), k, s, 0)
            else:  # depthwise: pool the input directly, zero padding is exact
                z = avg_pool(x, k, s, p)
            y, _ = bn(branch, "avgbn", z)
        elif branch == "1xk":
            z = conv2d(x, bp["conv"]["kernel"], s, ((p - k // 2, p - k // 2), (p, p)), g)
            y, _ = bn(branch, "bn", z)
        elif branch == "kx1":
            z = conv2d(x, bp["conv"]["kernel"], s, ((p, p), (p - k // 2, p - k // 2)), g)
            y, _ = bn(branch, "bn", z)
        elif branch == "id":
            y, _ = bn(branch, "bn", x)
        out = y if out is None else out + y
    return out, new_stats


def inner_slot_input(params, stats, x, geom: ConvGeometry, branches, eps: float = EPS):
    """Input seen by the slot nested at `branches` (e.g. ['kxk'] or ['1x1_kxk', 'kxk']).

    The enclosing blocks run in inference mode: `kxk` passes its input through;
    `1x1_kxk` applies conv1 -> bn1 and pads with BN(0), as `apply_block` does.
    """
    for branch in branches:
        bp, bs = params[branch], stats.get(branch, {})
        if branch == "kxk":
            params, stats = bp["conv"], bs.get("conv", {})
        elif branch == "1x1_kxk":
            z = conv2d(x, bp["conv1"]["kernel"], 1, ((0, 0), (0, 0)), geom.groups)
            z, _, (_, c) = batch_norm(bp["bn1"], bs["bn1"], z, False, eps=eps)
            x = pad_with_values(z, geom.pad, c)
            geom = child_geometry(geom, branch)
            params, stats = bp["conv2"], bs.get("conv2", {})
        else:
            raise ValueError(f"branch '{branch}' holds no nested slot")
    return x
