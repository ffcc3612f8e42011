"""One conv + one BN for several 1x1 convs of the same input (a training-mode speed-up).

The branches whose first op is a 1x1 conv of the block input (`1x1` at stride 1,
`1x1_kxk`'s conv1, `1x1_avg`'s conv) can run as ONE conv with their output channels
concatenated and ONE BN call over those channels. BN is per channel, so outputs and
running statistics equal those of separate calls; XLA gets fewer, bigger kernels.
"""

from __future__ import annotations

import jax.numpy as jnp

from dyrep_jax.rep.bn import batch_norm
from dyrep_jax.rep.ops import NO_PAD, conv2d


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


def shared_1x1(params, stats, x, groups: int, parts, momentum, eps):
    """Training-mode conv + BN of `parts` [(branch, conv, bn)] at once.

    Returns [(y, new bn stats, bn shift c)] per part, as separate calls would.
    """
    kernels = [params[b][conv]["kernel"] for b, conv, _ in parts]
    sizes = [k.shape[-1] for k in kernels]
    z = conv2d(x, concat_channels(kernels, groups), 1, NO_PAD, groups)
    bn_params = {key: concat_channels([params[b][bn][key] for b, _, bn in parts], groups)
                 for key in ("scale", "bias")}
    bn_stats = {key: concat_channels([stats[b][bn][key] for b, _, bn in parts], groups)
                for key in ("mean", "var")}
    y, new_stats, (_, c) = batch_norm(bn_params, bn_stats, z, True, momentum, eps)
    ys, cs = split_channels(y, sizes, groups), split_channels(c, sizes, groups)
    split_stats = {key: split_channels(new_stats[key], sizes, groups) for key in ("mean", "var")}
    return [(ys[i], {key: split_stats[key][i] for key in ("mean", "var")}, cs[i])
            for i in range(len(parts))]
