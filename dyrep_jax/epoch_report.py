"""What an epoch reports: its stats value, and the TensorBoard scalars of steps and epochs."""

from __future__ import annotations

import dataclasses
import time

from dyrep_jax.experiment import to_host
from dyrep_jax.reporting import describe_decision


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """What one (possibly preempted) pass over an epoch's batches measured."""

    train_loss: float
    train_top1: float
    lr: float
    img_per_s: float
    started: float  # perf_counter() at the epoch's start (epoch_s runs to its metrics line)
    compile_before: float  # StepCache.compile_seconds then (compile_s runs to the same line)
    stopped_at: int | None = None  # step in epoch where a preemption stopped it, else None
    partial: dict | None = None  # at a preemption: raw sums (loss_sum, correct, seen) so far

    def record(self) -> dict:
        return {"train_loss": self.train_loss, "train_top1": self.train_top1, "lr": self.lr,
                "img_per_s": self.img_per_s}


def epoch_stats(batch_size: int, sums, seen, rate, epoch_start, compile_before,
                stopped_at=None) -> EpochStats:
    """EpochStats from the step sums of one (possibly preempted) pass."""
    host = to_host(sums) if sums is not None else {"loss": 0.0, "correct": 0, "lr": 0.0}
    partial = None if stopped_at is None else {
        "loss_sum": float(host["loss"]), "correct": int(host["correct"]), "seen": seen}
    return EpochStats(
        partial=partial, train_loss=float(host["loss"]) / max(seen, 1),
        train_top1=float(host["correct"]) / max(seen * batch_size, 1),
        lr=float(host["lr"]), img_per_s=rate,
        started=epoch_start, compile_before=compile_before, stopped_at=stopped_at)


def step_scalars(tb, step: int, host_sums, seen: int, window, batch_size: int) -> tuple:
    """TensorBoard train/* scalars at global `step`: means over the steps since `window`."""
    last_sums, last_seen, last_time = window
    now, n = time.perf_counter(), seen - last_seen
    if last_sums is None:
        last_sums = {"loss": 0.0, "correct": 0}
    tb.scalars(step, {
        "train/loss": (float(host_sums["loss"]) - float(last_sums["loss"])) / n,
        "train/top1": (float(host_sums["correct"]) - float(last_sums["correct"]))
        / (n * batch_size),
        "train/lr": float(host_sums["lr"]),
        "train/images_per_s": n * batch_size / max(now - last_time, 1e-9)})
    return host_sums, seen, now


def epoch_scalars(tb, record: dict, decisions, steps_per_epoch: int):
    """Eval, structure and timing scalars (and structure changes as text) at the global step."""
    step = record["epoch"] * steps_per_epoch
    tb.scalars(step, {
        "epoch": record["epoch"], "eval/loss": record["test_loss"],
        "eval/top1": record["test_top1"],
        "eval/top1_before_adjust": record["test_top1_before_adjust"],
        "epoch/train_loss": record["train_loss"], "epoch/train_top1": record["train_top1"],
        "structure/blocks": record["grown_slots"], "structure/params": record["params"],
        "structure/macs": record["macs"], "structure/changes": record["structure_changes"],
        "time/epoch_s": record["epoch_s"], "time/compile_s": record["compile_s"]})
    if decisions:
        tb.text("structure", "\n\n".join(describe_decision(d) for d in decisions), step)
    tb.flush()
