"""The DyRep controller: saliency scores, when and what to grow, Dep, decisions as data.

Scores are accumulated inside the jitted train step (`saliency.accumulate`), one
float per eligible slot, from the same gradients the optimizer uses. The host
only reads them at an adjustment. `adjust` is a pure-ish host function
`variables -> (variables, decisions)`: it decides, and `rep` transforms.
`Controller` owns the schedule (`plan`: adjust or recalibrate after an epoch)
and the calibration glue; the trainer asks `after_epoch` and applies the result.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dyrep_jax.calibration import calibrate_block, calibrate_network
from dyrep_jax.models import count_macs, count_params
from dyrep_jax.rep import MAX_NESTING, allowed_branches
from dyrep_jax.rep.dep import branch_importance, dep_decision
from dyrep_jax.rep.grow import regrow_matching
from dyrep_jax.rep.introspect import slot_geometries
from dyrep_jax.rep.network import cut_at, geometry_at, grow_at
from dyrep_jax.rep.tree import all_slots, dotted, get_at, is_block_node, set_at
from dyrep_jax.saliency import METRICS

log = logging.getLogger("dyrep_jax")

MODES = ("plain", "dbb", "rep", "dyrep")


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


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """The controller's fields of an experiment config (documented in config_base.py)."""

    mode: str
    metric: str
    grow_topk: int
    calib_batches: int
    dep_std_threshold: float
    dep_abs_threshold: float
    adjust_interval: int
    max_adjust_epochs: int
    recal_bn_every_epoch: bool
    recal_bn_batches: int
    num_epochs: int

    @classmethod
    def from_config(cls, config, **overrides) -> ControllerConfig:
        """From a whole experiment config (`config.dyrep` plus `num_epochs`)."""
        d = config.dyrep
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name != "num_epochs"}
        return cls(**{**fields, "num_epochs": config.num_epochs, **overrides})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}' (valid: {', '.join(MODES)})")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric '{self.metric}' (valid: {', '.join(METRICS)})")
        if self.adjust_interval < 1:
            raise ValueError(f"dyrep.adjust_interval must be >= 1, got {self.adjust_interval}")

    @property
    def grows(self) -> bool:
        return self.mode in ("rep", "dyrep")

    @property
    def cuts(self) -> bool:
        return self.mode == "dyrep"


def pick_slots(scores: np.ndarray, paths: list, topk: int) -> list[tuple]:
    """The top-k slots by accumulated score (ties broken by network order)."""
    if len(paths) == 0:
        return []
    order = sorted(range(len(paths)), key=lambda i: (-float(scores[i]), i))
    return [paths[i] for i in order[:topk]]


def _grow(key, params, stats, top_geometries, scores, paths, cfg, calibrate):
    """Grow the top-k slots, calibrate each new block, re-match it to the old function."""
    decisions = []
    score_of = {dotted(p): float(s) for p, s in zip(paths, scores, strict=True)}
    for i, path in enumerate(pick_slots(scores, paths, cfg.grow_topk)):
        geom = geometry_at(params, path, top_geometries)
        old = get_at(params, path)
        params, stats = grow_at(jax.random.fold_in(key, i), params, stats, path, geom,
                                allowed_branches(geom))
        calibrated = calibrate({"params": params, "batch_stats": stats}, path)
        block, block_stats = regrow_matching(get_at(params, path), calibrated, old)
        params, stats = set_at(params, path, block), set_at(stats, path, block_stats)
        decisions.append({
            "op": "grow", "slot": dotted(path), "branches": list(block),
            "score": score_of[dotted(path)],
            "top_scores": dict(sorted(score_of.items(), key=lambda kv: -kv[1])[:5]),
        })
    return params, stats, decisions


def _cut(params, stats, cfg):
    """Dep on every block (nested ones too): cut the branches it names."""
    decisions = []
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
    return params, stats, decisions


def adjust(key, variables, top_geometries: dict, scores: np.ndarray, paths: list,
           cfg: ControllerConfig, calibrate: Callable[[dict, tuple], dict], *, grow: bool,
           cut: bool) -> tuple[dict, list[dict]]:
    """One adjustment: grow the top-scoring slots, calibrate, re-match, then Dep.

    `variables` are host-side trees; `calibrate(variables, path)` returns the
    calibrated batch_stats of the (new) block at `path`. Returns
    (new_variables, decisions); each decision is a dict record.
    """
    params, stats, decisions = variables["params"], variables["batch_stats"], []
    if grow:
        params, stats, grown = _grow(key, params, stats, top_geometries, scores, paths, cfg,
                                     calibrate)
        decisions += grown
    if cut:
        params, stats, cuts = _cut(params, stats, cfg)
        decisions += cuts
    return {"params": params, "batch_stats": stats}, decisions


class Plan(NamedTuple):
    """What the controller does after an epoch."""

    adjust: bool
    recalibrate: bool


class Outcome(NamedTuple):
    """Host-side variables after the controller acted, and its decision records."""

    variables: dict
    decisions: list[dict]
    plan: Plan

    @property
    def structure_changed(self) -> bool:
        return bool(self.decisions)


class Controller:
    """Owns the schedule, the calibration glue and the decision records.

    The trainer lends it `batches(epoch, count)` (device-ready, normalized
    training images of epoch `epoch`, at most `count` batches), `replicate`
    (host tree -> device tree) and `to_host` (the inverse).
    """

    def __init__(self, cfg: ControllerConfig, model, image_shape, key, *,
                 batches: Callable, replicate: Callable, to_host: Callable):
        self.cfg, self.model, self.image_shape, self.key = cfg, model, tuple(image_shape), key
        self.batches, self.replicate, self.to_host = batches, replicate, to_host

    def eligible(self, params) -> list[tuple]:
        """Slots that carry a score (none when the mode does not grow)."""
        return eligible_slots(params) if self.cfg.grows else []

    def plan(self, epoch_done: int) -> Plan:
        """Adjust every `adjust_interval` epochs up to `max_adjust_epochs` (never after the
        last epoch); recalibrate all BNs in the other epochs up to `max_adjust_epochs`."""
        c = self.cfg
        in_window = epoch_done <= c.max_adjust_epochs
        due = (c.grows and epoch_done % c.adjust_interval == 0 and in_window
               and epoch_done < c.num_epochs)
        return Plan(adjust=due, recalibrate=c.recal_bn_every_epoch and in_window and not due)

    def after_epoch(self, epoch_done: int, variables: dict, scores, step: int) -> Outcome | None:
        """Act on host-side `variables` after `epoch_done` epochs; None when nothing is due.

        `scores` are the per-step mean saliency of `self.eligible(params)`.
        """
        plan = self.plan(epoch_done)
        if plan.adjust:
            variables, decisions = self._adjust(epoch_done, variables, scores, step)
            return Outcome(variables, decisions, plan)
        if plan.recalibrate:
            stats = calibrate_network(self.model, self.replicate(variables),
                                      self.batches(epoch_done, self.cfg.recal_bn_batches))
            return Outcome({**variables, "batch_stats": self.to_host(stats)}, [], plan)
        return None

    def geometries(self, variables) -> dict:
        return {k: v.geometry for k, v in self.slot_infos(variables).items()}

    def slot_infos(self, variables) -> dict:
        """{top-level slot path: SlotInfo(geometry, input shape)} for one image."""
        x = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
        return slot_geometries(self.model, variables, x)

    def _adjust(self, epoch_done, variables, scores, step):
        start = time.perf_counter()
        geometries = self.geometries(variables)

        def calibrate(current, path):
            return self.to_host(calibrate_block(
                self.model, self.replicate(current), path, geometries,
                self.batches(epoch_done, self.cfg.calib_batches)))

        key = jax.random.fold_in(self.key, 20_000 + epoch_done)
        variables, decisions = adjust(key, variables, geometries, scores,
                                      self.eligible(variables["params"]), self.cfg, calibrate,
                                      grow=self.cfg.grows, cut=self.cfg.cuts)
        params_n = count_params(variables["params"])
        macs = count_macs(self.model, variables, self.image_shape)
        for record in decisions:
            record.update(epoch=epoch_done, step=int(step), params=params_n, macs=macs)
        log.info("adjustment after epoch %d took %.1fs", epoch_done, time.perf_counter() - start)
        return variables, decisions
