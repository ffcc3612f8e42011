"""Block forward passes that do less work, with the branchwise reference's results.

Inference: every branch is affine, so the block runs as the one conv `fuse_slot` gives
(exact; it is what deployment runs). Training: BNs use batch statistics, so branches
cannot be folded, but the branches whose first op is a 1x1 conv of the block input
(`1x1` at stride 1, `1x1_kxk`'s conv1, `1x1_avg`'s conv) run as ONE conv with their
output channels concatenated and ONE BN call over those channels. BN is per channel,
so outputs and running statistics equal those of separate calls; XLA gets fewer,
bigger kernels. The parameter and statistics trees are read as they are (no new layout).
"""

from __future__ import annotations

import jax.numpy as jnp

from dyrep_jax.rep.apply import apply_slot, avg_pool, conv2d, pad_with_values
from dyrep_jax.rep.bn import batch_norm
from dyrep_jax.rep.fuse import fuse_slot
from dyrep_jax.rep.geometry import BRANCH_NAMES, ConvGeometry, child_geometry

NO_PAD = ((0, 0), (0, 0))
# Share the 1x1 convs of x in training. Measured on a CPU: about 5% slower on DBB blocks
# (the concatenated conv and its gradient cost extra copies there); the win expected on a
# GPU (fewer, bigger kernels) is still to be measured: bench_train.py --blocks unshared.
SHARE_1X1 = True


def fused_block(params, stats, x, geom: ConvGeometry, eps: float):
    """Inference-mode block as its fused conv; statistics are returned unchanged."""
    fused = fuse_slot(params, stats, eps)
    p = geom.pad
    y = conv2d(x, fused["kernel"], geom.stride, ((p, p), (p, p)), geom.groups)
    return y + fused["bias"].astype(y.dtype), stats


def shared_1x1_parts(params, geom: ConvGeometry) -> list[tuple[str, str, str]]:
    """(branch, conv name, bn name) of the 1x1 convs of x that can share one conv."""
    parts = []
    if "1x1" in params and geom.stride == 1:
        parts.append(("1x1", "conv", "bn"))
    if "1x1_kxk" in params:
        parts.append(("1x1_kxk", "conv1", "bn1"))
    if "1x1_avg" in params and "conv" in params["1x1_avg"]:
        parts.append(("1x1_avg", "conv", "bn"))
    return parts


def concat_channels(arrays, groups: int):
    """Concatenate along the last axis, group by group (the layout a grouped conv uses).

    Output channel o of a conv with `groups` groups belongs to group o // (C / groups);
    stacking each array's per-group channels keeps every channel in its own group.
    """
    if groups == 1:
        return jnp.concatenate(arrays, axis=-1)
    split = [a.reshape(*a.shape[:-1], groups, a.shape[-1] // groups) for a in arrays]
    joined = jnp.concatenate(split, axis=-1)
    return joined.reshape(*joined.shape[:-2], -1)


def split_channels(array, sizes, groups: int):
    """Inverse of `concat_channels`: the parts of `sizes` channels each."""
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size // groups)
    grouped = array if groups == 1 else array.reshape(*array.shape[:-1], groups, bounds[-1])
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = grouped[..., lo:hi]
        parts.append(part if groups == 1 else part.reshape(*array.shape[:-1], -1))
    return parts


def shared_1x1(params, stats, x, geom: ConvGeometry, parts, momentum, eps):
    """One conv + one BN for `parts`; returns [(y, new bn stats, bn shift c)] per part."""
    g = geom.groups
    kernels = [params[b][conv]["kernel"] for b, conv, _ in parts]
    sizes = [k.shape[-1] for k in kernels]
    z = conv2d(x, concat_channels(kernels, g), 1, NO_PAD, g)
    bn_params = {key: concat_channels([params[b][bn][key] for b, _, bn in parts], g)
                 for key in ("scale", "bias")}
    bn_stats = {key: concat_channels([stats[b][bn][key] for b, _, bn in parts], g)
                for key in ("mean", "var")}
    y, new_stats, (_, c) = batch_norm(bn_params, bn_stats, z, True, momentum, eps)
    ys, cs = split_channels(y, sizes, g), split_channels(c, sizes, g)
    split_stats = {key: split_channels(new_stats[key], sizes, g) for key in ("mean", "var")}
    return [(ys[i], {key: split_stats[key][i] for key in ("mean", "var")}, cs[i])
            for i in range(len(parts))]


def train_block(params, stats, x, geom: ConvGeometry, momentum: float, eps: float):
    """Training-mode block (batch statistics) with the shared 1x1 conv and BN (`SHARE_1X1`)."""
    k, s, p, g = geom.kernel_size, geom.stride, geom.pad, geom.groups
    new_stats = {}

    def bn(branch, name, z):
        y, st, affine = batch_norm(params[branch][name], stats[branch][name], z, True,
                                   momentum, eps)
        new_stats.setdefault(branch, {})[name] = st
        return y, affine

    def nested(branch, name, z, child):
        z, inner = apply_slot(params[branch][name], stats[branch].get(name, {}), z, child, True,
                              momentum, eps)
        if name in stats[branch]:
            new_stats.setdefault(branch, {})[name] = inner
        return z

    parts = shared_1x1_parts(params, geom)
    shared = {}
    if SHARE_1X1 and len(parts) > 1:
        results = shared_1x1(params, stats, x, geom, parts, momentum, eps)
        for (branch, _, bn_name), (y, st, c) in zip(parts, results, strict=True):
            new_stats.setdefault(branch, {})[bn_name] = st
            shared[branch] = (y, c)
    out = None
    for branch in [b for b in BRANCH_NAMES if b in params]:  # reference order: same rounding
        bp = params[branch]
        if branch == "kxk":
            y, _ = bn(branch, "bn", nested(branch, "conv", x, geom))
        elif branch == "1x1":
            if branch in shared:
                y = shared[branch][0]
            else:
                y, _ = bn(branch, "bn", conv2d(x, bp["conv"]["kernel"], s, NO_PAD, g))
        elif branch == "1x1_kxk":
            if branch in shared:
                z, c = shared[branch]
            else:
                z, (_, c) = bn(branch, "bn1", conv2d(x, bp["conv1"]["kernel"], 1, NO_PAD, g))
            z = nested(branch, "conv2", pad_with_values(z, p, c), child_geometry(geom, branch))
            y, _ = bn(branch, "bn2", z)
        elif branch == "1x1_avg":
            if branch in shared:
                z, c = shared[branch]
                z = avg_pool(pad_with_values(z, p, c), k, s, 0)
            elif "conv" in bp:
                z, (_, c) = bn(branch, "bn", conv2d(x, bp["conv"]["kernel"], 1, NO_PAD, g))
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
        else:  # id
            y, _ = bn(branch, "bn", x)
        out = y if out is None else out + y
    return out, new_stats
