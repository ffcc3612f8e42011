"""Saliency of conv slots, accumulated inside the jitted train step.

Metrics (one float32 per eligible slot and step, summed until an adjustment):
- `synflow_naive`: sum(grad_W * W), the reference's formula, computed as written.
- `synflow_stable`: the same quantity through an identity. For a conv (bias or not)
  followed directly by a train-mode BN (per channel c: scale gamma_c, biased batch
  variance s_c^2 of the conv output), scaling W_c by t leaves the BN output
  t*u/sqrt(t^2 s_c^2 + eps) (the bias cancels in the mean), whose t-derivative at 1 is
  x_hat * eps/(s_c^2 + eps). Hence

      sum(grad_W * W) = sum_c gamma_c * dL/dgamma_c * eps / (s_c^2 + eps).

  Small but not zero (eps breaks the scale invariance). The naive sum reaches it by
  cancelling large terms, so its value depends on precision; the right-hand side has
  no cancellation and is made of float32 quantities even under bf16 compute.
  s_c^2 comes from the BN's running-variance update (PyTorch: new = (1-m) old + m *
  unbiased batch var) and the count of values it normalized (`bn_counts`), see
  `batch_var_from_update`; this assumes the step ran that BN in train mode with
  momentum MOMENTUM (as every training forward does). A slot not followed directly
  by a BN (a plain slot in a ConvBN without BN: RepVGG, or `with_bn_after_3x3=False`;
  slots nested in blocks always have their branch BN) falls back to the naive
  formula; `score_plan` lists which.
- `snip`: sum(|grad_W * W|); `grad_norm`: ||grad_W||; `random`: U(0, 1).
- `synflow`: the name experiments use; it means `SYNFLOW` (see its comment).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dyrep_jax.rep.bn import EPS, MOMENTUM
from dyrep_jax.rep.tree import get_at

# `metric=synflow` names this form (experiments/results/saliency.md has the data).
SYNFLOW = "synflow_stable"
METRICS = ("synflow", "synflow_naive", "synflow_stable", "snip", "grad_norm", "random")
# conv name inside a ConvBN unit or a block branch -> the BN it feeds directly
BN_AFTER = {"conv": "bn", "conv1": "bn1", "conv2": "bn2"}


def resolve_metric(metric: str) -> str:
    """`synflow` -> the chosen form; other names checked and returned."""
    if metric not in METRICS:
        raise ValueError(f"unknown saliency metric '{metric}' (valid: {', '.join(METRICS)})")
    return SYNFLOW if metric == "synflow" else metric


def following_bn(params, path) -> tuple | None:
    """Path of the BN that directly follows the conv slot at `path`, or None.

    A slot `(..., 'conv')` feeds the sibling `bn` (a ConvBN unit, or a block's `kxk`
    branch); `(..., '1x1_kxk', 'conv2')` feeds `bn2`. The BN must exist and have one
    scale per output channel of the slot's kernel.
    """
    if not path or path[-1] not in BN_AFTER:
        return None
    bn_path = (*path[:-1], BN_AFTER[path[-1]])
    bn, slot = get_at(params, bn_path), get_at(params, path)
    if not isinstance(bn, Mapping) or not isinstance(slot, Mapping):
        return None
    if "scale" not in bn or "kernel" not in slot:
        return None
    if bn["scale"].shape != (slot["kernel"].shape[-1],):
        return None
    return bn_path


def score_plan(params, paths) -> list[tuple[tuple, tuple | None]]:
    """(slot path, BN path or None) per slot; None means synflow_stable uses the naive form."""
    return [(p, following_bn(params, p)) for p in paths]


def batch_var_from_update(var_before, var_after, count: int | None = None,
                          momentum: float = MOMENTUM):
    """Biased batch variance (what BN normalized with) from one running-variance update.

    PyTorch's update stores the unbiased variance; `count` (N*H*W values per channel)
    turns it back into the biased one. Without it the result is the unbiased variance,
    off by a factor n/(n-1). Float32 error: about 5 * 2^-24 * var_after absolute (one
    rounding of the update, divided by the momentum).
    """
    unbiased = jnp.maximum((var_after - (1.0 - momentum) * var_before) / momentum, 0.0)
    return unbiased if count is None else unbiased * ((count - 1) / count)


def bn_counts(top_geometries, paths, batch: int) -> tuple[int, ...]:
    """Values per channel each slot's following BN normalizes: batch * H_out * W_out.

    `top_geometries`: {top-level slot path: SlotInfo} (`rep.introspect.slot_geometries`).
    A nested slot has its top-level slot's output size (kxk and 1x1_kxk's conv2 keep
    the block's stride and padding).
    """
    counts = []
    for path in paths:
        top = max((t for t in top_geometries if tuple(path[:len(t)]) == tuple(t)), key=len,
                  default=None)
        if top is None:
            raise ValueError(f"slot {path} lies in no top-level slot of `top_geometries`")
        geom, (_, h, w, _) = top_geometries[top]
        k, s, p = geom.kernel_size, geom.stride, geom.pad
        counts.append(batch * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1))
    return tuple(counts)


def synflow_naive(grad_kernel, kernel):
    return jnp.sum(grad_kernel.astype(jnp.float32) * kernel.astype(jnp.float32))


def synflow_through_bn(gamma, grad_gamma, batch_var, eps: float = EPS):
    """sum_c gamma_c * dL/dgamma_c * eps / (s_c^2 + eps) in float32."""
    g, dg = gamma.astype(jnp.float32), grad_gamma.astype(jnp.float32)
    return jnp.sum(g * dg * (eps / (batch_var.astype(jnp.float32) + eps)))


def plain_score(metric: str, grad_kernel, kernel, rng=None):
    """Scores that need only the slot's kernel and its gradient."""
    if metric in ("synflow_naive", "synflow_stable"):
        return synflow_naive(grad_kernel, kernel)
    g, w = grad_kernel.astype(jnp.float32), kernel.astype(jnp.float32)
    if metric == "snip":
        return jnp.sum(jnp.abs(g * w))
    if metric == "grad_norm":
        return jnp.sqrt(jnp.sum(g * g))
    if metric == "random":
        return jax.random.uniform(rng, ())
    raise ValueError(f"unknown saliency metric '{metric}' (valid: {', '.join(METRICS)})")


def slot_scores(grads, params, stats_before, stats_after, paths, metric: str, rng,
                counts=None, eps: float = EPS, momentum: float = MOMENTUM):
    """This step's score of every slot in `paths` (float32 vector, jit-friendly).

    `stats_before`/`stats_after`: the batch_stats trees the step started from and
    the forward pass returned; `counts`: `bn_counts(...)` or None (see
    `batch_var_from_update`). Only `synflow_stable` reads these three.
    """
    metric = resolve_metric(metric)
    keys = jax.random.split(rng, len(paths))
    counts = [None] * len(paths) if counts is None else counts
    out = []
    for path, key, count in zip(paths, keys, counts, strict=True):
        bn_path = following_bn(params, path) if metric == "synflow_stable" else None
        if bn_path is None:
            out.append(plain_score(metric, get_at(grads, path)["kernel"],
                                   get_at(params, path)["kernel"], key))
            continue
        var = batch_var_from_update(get_at(stats_before, bn_path)["var"],
                                    get_at(stats_after, bn_path)["var"], count, momentum)
        out.append(synflow_through_bn(get_at(params, bn_path)["scale"],
                                      get_at(grads, bn_path)["scale"], var, eps))
    return jnp.stack(out)


def accumulate(scores, grads, params, stats_before, stats_after, paths, metric: str, rng,
               counts=None):
    """scores + this step's slot scores; call after the gradient, before the update."""
    if not paths:
        return scores
    return scores + slot_scores(grads, params, stats_before, stats_after, paths, metric, rng,
                                counts)
