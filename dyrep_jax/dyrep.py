"""The DyRep controller: saliency scores, when and what to grow, Dep, decisions as data.

Scores are accumulated inside the jitted train step (`accumulate_scores`), one
float per eligible slot, from the same gradients the optimizer uses. The host
only reads them at an adjustment. `adjust` is a pure-ish host function
`variables -> (variables, decisions)`: it decides, and `rep` transforms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dyrep_jax.rep import MAX_NESTING, allowed_branches
from dyrep_jax.rep.apply import apply_slot as run_slot
from dyrep_jax.rep.apply import inner_slot_input
from dyrep_jax.rep.dep import branch_importance, dep_decision
from dyrep_jax.rep.grow import regrow_matching
from dyrep_jax.rep.introspect import capture_slot_inputs
from dyrep_jax.rep.network import cut_at, geometry_at, grow_at, split_slot_path
from dyrep_jax.rep.tree import all_slots, dotted, get_at, is_block_node, set_at

METRICS = ("synflow", "snip", "grad_norm", "random")
MODES = ("plain", "dbb", "rep", "dyrep")
DBB_BRANCHES = ("1x1", "1x1_kxk", "1x1_avg", "kxk")


def eligible_slots(params) -> list[tuple]:
    """Plain slots with a square kernel > 1 inside fewer than MAX_NESTING blocks."""
    out = []
    for path, depth in all_slots(params):
        slot = get_at(params, path)
        if is_block_node(slot) or depth >= MAX_NESTING:
            continue
        kh, kw = slot["kernel"].shape[:2]
        if kh == kw and kh > 1:
            out.append(path)
    return out


def slot_score(metric: str, grad, weight, rng=None):
    """Saliency of one conv from its kernel gradient (float32 scalar)."""
    g, w = grad.astype(jnp.float32), weight.astype(jnp.float32)
    if metric == "synflow":
        return jnp.sum(g * w)
    if metric == "snip":
        return jnp.sum(jnp.abs(g * w))
    if metric == "grad_norm":
        return jnp.sqrt(jnp.sum(g * g))
    if metric == "random":
        return jax.random.uniform(rng, ())
    raise ValueError(f"unknown saliency metric '{metric}' (valid: {', '.join(METRICS)})")


def accumulate_scores(scores, grads, params, paths, metric: str, rng):
    """scores + this step's score of every eligible slot (jit-friendly)."""
    if not paths:
        return scores
    keys = jax.random.split(rng, len(paths))
    step = jnp.stack([
        slot_score(metric, get_at(grads, p)["kernel"], get_at(params, p)["kernel"], k)
        for p, k in zip(paths, keys, strict=True)
    ])
    return scores + step


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """What the controller needs from the experiment config (see configs/ for docs)."""

    mode: str = "dyrep"
    metric: str = "synflow"
    grow_topk: int = 1
    calib_batches: int = 20
    dep_std_threshold: float = 0.02
    dep_abs_threshold: float = 0.1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}' (valid: {', '.join(MODES)})")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric '{self.metric}' (valid: {', '.join(METRICS)})")

    @property
    def grows(self) -> bool:
        return self.mode in ("rep", "dyrep")

    @property
    def cuts(self) -> bool:
        return self.mode == "dyrep"


def dbb_initial_branches(path, geom):
    """Static DBB baseline: every 3x3 (stride-any) slot starts as a 4-branch block."""
    if geom.kernel_size == 3:
        return tuple(b for b in DBB_BRANCHES if b in allowed_branches(geom))
    return None


def pick_slots(scores: np.ndarray, paths: list, topk: int) -> list[tuple]:
    """The top-k slots by accumulated score (ties broken by network order)."""
    if len(paths) == 0:
        return []
    order = sorted(range(len(paths)), key=lambda i: (-float(scores[i]), i))
    return [paths[i] for i in order[:topk]]


def calibrate_block(model, variables, path, top_geometries, batches: Iterable):
    """Cumulative-average BN statistics of the block at `path` over `batches`.

    The rest of the network runs in inference mode (it is not changed); the
    block's own BNs see batch statistics, as in the reference calibration. The
    statistics come from one jitted function, so with sharded (global) batches
    they are global-batch statistics on every host.
    """
    params = variables["params"]
    top, branches = split_slot_path(params, path)
    top_geom = top_geometries[top]
    top_geom = getattr(top_geom, "geometry", top_geom)
    geom = geometry_at(params, path, top_geometries)

    @jax.jit
    def block_batch_stats(variables, images):
        p, s = variables["params"], variables["batch_stats"]
        x = capture_slot_inputs(model, variables, images, [top])[top]
        x = inner_slot_input(get_at(p, top), get_at(s, top, {}), x, top_geom, branches)
        _, batch_stats = run_slot(get_at(p, path), get_at(s, path, {}), x, geom, train=True,
                                  momentum=1.0)
        return batch_stats

    total, count = None, 0
    for images in batches:
        batch_stats = block_batch_stats(variables, images)
        total = batch_stats if total is None else jax.tree_util.tree_map(jnp.add, total,
                                                                        batch_stats)
        count += 1
    if count == 0:
        return get_at(variables["batch_stats"], path, {})
    return jax.tree_util.tree_map(lambda t: t / count, total)


def adjust(
    key,
    variables,
    top_geometries: dict,
    scores: np.ndarray,
    paths: list,
    cfg: ControllerConfig,
    calibrate: Callable[[dict, tuple], dict],
    *,
    grow: bool,
    cut: bool,
) -> tuple[dict, list[dict]]:
    """One adjustment: grow the top-scoring slots, calibrate, re-match, then Dep.

    `variables` are host-side trees; `calibrate(variables, path)` returns the
    calibrated batch_stats of the (new) block at `path` (the trainer runs it
    on the devices, e.g. with `calibrate_block`). Returns (new_variables,
    decisions); each decision is a dict record.
    """
    decisions = []
    params, stats = variables["params"], variables["batch_stats"]
    if grow:
        chosen = pick_slots(scores, paths, cfg.grow_topk)
        score_of = {dotted(p): float(s) for p, s in zip(paths, scores, strict=True)}
        for i, path in enumerate(chosen):
            geom = geometry_at(params, path, top_geometries)
            old = get_at(params, path)
            branches = allowed_branches(geom)
            params, stats = grow_at(jax.random.fold_in(key, i), params, stats, path, geom,
                                    branches)
            calibrated = calibrate({"params": params, "batch_stats": stats}, path)
            block, block_stats = regrow_matching(get_at(params, path), calibrated, old)
            params, stats = set_at(params, path, block), set_at(stats, path, block_stats)
            decisions.append({
                "op": "grow", "slot": dotted(path), "branches": list(block),
                "score": score_of[dotted(path)],
                "top_scores": dict(sorted(score_of.items(), key=lambda kv: -kv[1])[:5]),
            })
    if cut:
        for path, _ in all_slots(params):
            slot = get_at(params, path)
            if not is_block_node(slot):
                continue
            importance = branch_importance(slot)
            to_cut = dep_decision(importance, cfg.dep_std_threshold, cfg.dep_abs_threshold)
            if not to_cut:
                continue
            params, stats = cut_at(params, stats, path, to_cut)
            remaining = get_at(params, path)
            decisions.append({
                "op": "cut", "slot": dotted(path), "branches": list(to_cut),
                "importance": importance,
                "remaining": list(remaining) if is_block_node(remaining) else ["plain"],
            })
    return {"params": params, "batch_stats": stats}, decisions
