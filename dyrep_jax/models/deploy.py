"""Whole-network fusion: training variables -> deploy variables.

Generic by naming convention (see `ConvBN`): every slot found under the key
`conv` is fused into one conv, and a sibling `bn` is folded in and dropped.
A node holding `conv_kxk` is a block with fixed branches (RepVGG, timm's
names): its units `conv_kxk` and `conv_1x1` and its `identity` BN are summed
into one unit `conv`. The result runs on `create_model(name, ..., deploy=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from dyrep_jax.rep import RepError, fold_bn, fuse_slot
from dyrep_jax.rep.kernels import identity_kernel, pad_to_kxk
from dyrep_jax.rep.tree import is_slot


def fuse_network(variables) -> dict:
    """{'params', 'batch_stats'} -> {'params'} of the deploy network (pure, traceable).

    Dense layers are copied as they are. A BatchNorm that does not follow a
    conv slot cannot be folded and raises `RepError`.
    """
    return {"params": fuse_tree(variables["params"], variables.get("batch_stats", {}), ())}


def fuse_tree(params, stats, path) -> dict:
    """Fuse every slot below `params` (stats: the matching batch_stats sub-tree)."""
    if "conv_kxk" in params:
        return fuse_fixed_block(params, stats, path)
    folds_bn = "bn" in params and is_slot(params.get("conv"))
    out = {}
    for key, node in params.items():
        node_stats = stats.get(key, {}) if isinstance(stats, Mapping) else {}
        here = (*path, key)
        if folds_bn and key == "bn":
            continue
        if not isinstance(node, Mapping):
            out[key] = node
        elif is_slot(node):
            out[key] = fuse_slot(node, node_stats)
        elif _is_bn_stats(node_stats):
            raise RepError(f"{'.'.join(here)}: BatchNorm not after a 'conv' slot cannot be fused")
        else:
            out[key] = fuse_tree(node, node_stats, here)
    if folds_bn:
        bn_stats = stats.get("bn") if isinstance(stats, Mapping) else None
        if not _is_bn_stats(bn_stats):
            raise RepError(f"{'.'.join((*path, 'bn'))}: missing running statistics")
        kernel, bias = fold_bn(out["conv"]["kernel"], out["conv"]["bias"], params["bn"], bn_stats)
        out["conv"] = {"kernel": kernel, "bias": bias}
    return out


def _is_bn_stats(node) -> bool:
    return isinstance(node, Mapping) and "mean" in node and "var" in node


def fuse_fixed_block(params, stats, path) -> dict:
    """RepVGG's block -> {'conv': {'kernel', 'bias'}}: conv_kxk + conv_1x1 + identity BN."""
    unknown = set(params) - {"conv_kxk", "conv_1x1", "identity"}
    if unknown:
        raise RepError(f"{'.'.join(path)}: unexpected {sorted(unknown)} next to 'conv_kxk'")
    fused = fuse_tree(params["conv_kxk"], stats.get("conv_kxk", {}), (*path, "conv_kxk"))["conv"]
    kernel, bias = fused["kernel"], fused["bias"]
    k, in_per_group, channels = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    if "conv_1x1" in params:
        one = fuse_tree(params["conv_1x1"], stats.get("conv_1x1", {}), (*path, "conv_1x1"))["conv"]
        kernel, bias = kernel + pad_to_kxk(one["kernel"], k), bias + one["bias"]
    if "identity" in params:
        id_stats = stats.get("identity")
        if not _is_bn_stats(id_stats):
            raise RepError(f"{'.'.join((*path, 'identity'))}: missing running statistics")
        id_kernel, id_bias = fold_bn(identity_kernel(k, in_per_group, channels),
                                     jnp.zeros((channels,), jnp.float32), params["identity"],
                                     id_stats)
        kernel, bias = kernel + id_kernel, bias + id_bias
    return {"conv": {"kernel": kernel, "bias": bias}}
