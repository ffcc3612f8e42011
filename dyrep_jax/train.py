"""The training loop: data + model + optimizer + controller, sharded, checkpointed.

Flow per epoch: train steps (one compiled program per structure) -> eval ->
ask the controller (adjust the structure, or recalibrate BN) -> eval again if
the structure changed -> checkpoint -> one metrics line. At the end the
network is fused into the plain deploy network, evaluated, and saved in
DIR/fused/ (`Experiment.export_fused`, shared with --mode=export).
"""

from __future__ import annotations

import logging
import math
import signal
import time

import jax
import numpy as np

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import epoch_report, models, saliency
from dyrep_jax.compile_cache import use_persistent_cache
from dyrep_jax.dyrep import Controller, ControllerConfig
from dyrep_jax.epoch_report import EpochStats
from dyrep_jax.errors import TrainingError
from dyrep_jax.experiment import Experiment, Placement, check_workdir, to_host, validate_config
from dyrep_jax.optim import make_optimizer, make_schedule, remap_opt_state
from dyrep_jax.rep.tree import dotted, structure_of
from dyrep_jax.reporting import (
    JsonlLog,
    StepProfiler,
    TensorBoard,
    describe_decision,
    flat_hparams,
    format_eta,
    human,
    plot_structure,
)
from dyrep_jax.state import TrainState, mean_scores, new_train_state, variables_of
from dyrep_jax.steps import batch_specs, make_prepare_images, make_train_step
from dyrep_jax.workdir_lock import lock_workdir

log = logging.getLogger("dyrep_jax")

__all__ = ["EpochStats", "Placement", "Trainer", "TrainingError", "run", "to_host",
           "validate_config"]


class Trainer:
    """One run: `run()` trains to the end, resuming from the latest checkpoint if any."""

    def __init__(self, config, workdir: str, experiment: Experiment | None = None,
                 run_id: str | None = None):
        self.exp = exp = experiment or Experiment(config, workdir)
        self.run_id = run_id  # the workdir lock's, recorded in checkpoints
        self.config, self.workdir, self.place = config, exp.workdir, exp.place
        o, spe = config.optim, exp.inp.steps_per_epoch
        self.total_steps = spe * config.num_epochs
        self.schedule = make_schedule(o, spe, config.num_epochs)
        self.tx = make_optimizer(name=o.name, schedule=self.schedule, momentum=o.momentum,
                                 nesterov=o.nesterov, weight_decay=o.weight_decay,
                                 decay_bn_and_bias=o.decay_bn_and_bias,
                                 grad_clip_norm=o.grad_clip_norm)
        self.ctrl = Controller(ControllerConfig.from_config(config), exp.model, exp.image_shape,
                               exp.base_key, batches=self.calibration_batches,
                               replicate=self.place.replicate, to_host=to_host)
        self.metrics_log = JsonlLog(self.workdir / "metrics.jsonl")
        self.structure_log = JsonlLog(self.workdir / "structure.jsonl")
        self.manager = exp.checkpoint_manager()
        self.preempted = False
        self.tb = TensorBoard(None, enabled=False)  # run() opens DIR/tb
        self.profiler = StepProfiler(config.profile_steps, self.workdir / "profile")
        self.carried = None  # train sums of a resumed epoch's steps before the preemption

    # ------------------------------------------------------------------ state

    def new_state(self, variables, opt_state, step) -> TrainState:
        """A host state for `variables` with zeroed scores."""
        return new_train_state(variables, opt_state, step=step,
                               num_scores=len(self.ctrl.eligible(variables["params"])))

    def fresh_state(self) -> TrainState:
        rule = models.dbb_initial_branches if self.ctrl.cfg.mode == "dbb" else None
        key = jax.random.fold_in(self.exp.base_key, 0)
        variables = models.init_variables(self.exp.model, key, self.exp.image_shape,
                                          initial_branches=rule)
        return self.new_state(variables, self.tx.init(variables["params"]), 0)

    def restore(self):
        """(device state, meta) of the latest readable checkpoint, or None."""
        found = ckpt.restore(self.manager, self.tx.init, move_broken=True)
        if found is None:
            return None
        self.exp.check_checkpoint(found.meta, resuming=True)
        log.info("resumed from step %d (epoch %d, step %d in epoch); %d grown slots",
                 found.step, found.meta["epoch"], found.meta["step_in_epoch"],
                 len(found.meta.get("structure", {})))
        return self.place.replicate(found.state), found.meta

    def save(self, state, epoch: int, step_in_epoch: int, best: float, test_top1,
             partial=None):
        host = to_host(state)
        meta = ckpt.run_meta(epoch=epoch, step_in_epoch=step_in_epoch, best_test_top1=best,
                             name=self.config.name, model=self.config.model.name,
                             params=host["params"], identity=self.exp.identity(),
                             settings=self.exp.settings(), run_id=self.run_id, partial=partial)
        ckpt.save(self.manager, host, meta, test_top1)

    # ------------------------------------------------------------------ data for steps

    def compiled_train_step(self, state, images, labels, rng, wait: bool = True):
        exp = self.exp
        eligible = self.ctrl.eligible(state["params"])
        counts = None
        if eligible:
            infos = self.ctrl.slot_infos(variables_of(state))
            group = self.config.model.bn_group_size or images.shape[0]
            counts = saliency.bn_counts(infos, eligible, group)
        fn = make_train_step(
            exp.model, self.tx, self.schedule, eligible=eligible, bn_counts=counts,
            metric=self.ctrl.cfg.metric, num_classes=exp.num_classes,
            label_smoothing=self.config.optim.label_smoothing, mean=exp.mean, std=exp.std,
            augment_kind=exp.inp.device_augment, dtype=exp.dtype,
            fail_at_step=self.config.debug_fail_at_step)
        r, b = self.place.replicated, self.place.batch
        get = exp.steps.get if wait else exp.steps.prefetch
        return get("train", fn, (state, images, labels, rng), in_shardings=(r, b, b, r),
                   out_shardings=(r, r), donate=(0,))

    def prefetch_programs(self, state):
        """Start compiling the train and eval programs of `state`'s structure, side by side."""
        images, labels = batch_specs(self.config.batch_size, self.exp.image_shape,
                                     self.place.batch)
        rng = jax.ShapeDtypeStruct(self.exp.base_key.shape, self.exp.base_key.dtype)
        self.compiled_train_step(state, images, labels, rng, wait=False)
        self.exp.eval_program(self.exp.model, variables_of(state), "eval")

    def calibration_batches(self, epoch: int, count: int):
        """Up to `count` augmented, normalized training batches of `epoch` (a generator)."""
        exp = self.exp
        prepare = make_prepare_images(exp.mean, exp.std, exp.inp.device_augment, exp.dtype)
        key = jax.random.fold_in(exp.base_key, 10_000 + epoch)
        for i, batch in enumerate(exp.inp.train_iter(epoch)):
            if i >= count:
                return
            args = (jax.random.fold_in(key, i), self.place.shard_batch(batch["image"]))
            yield exp.steps.get("prepare", prepare, args)(*args)

    # ------------------------------------------------------------------ loop

    def start(self):
        """(state, epoch, step in epoch, best) to start from; clears logs a resume redoes."""
        restored = self.restore()
        logs = (self.metrics_log, self.structure_log)
        if restored is None:
            for f in logs:
                if self.exp.is_main:
                    f.remove()
            return self.place.replicate(self.fresh_state()), 0, 0, -1.0
        state, meta = restored
        self.carried = meta.get("partial") if meta["step_in_epoch"] else None
        if self.exp.is_main:
            for f in logs:
                f.truncate_after_epoch(meta["epoch"])
        return state, meta["epoch"], meta["step_in_epoch"], meta["best_test_top1"]

    def run(self) -> dict:
        wall_start = time.perf_counter()
        self.compile_mark = self.exp.steps.clock.mark()
        state, epoch, start_step, best = self.start()
        self.exp.write_config()
        self.prefetch_programs(state)
        self.tb = tb = TensorBoard(self.workdir / "tb", enabled=self.exp.is_main)
        tb.hparams(flat_hparams(self.config))
        # A pod stops through orbax's preemption sync point (jax's own SIGTERM
        # handler on every host); a single process through this handler.
        single = jax.process_count() == 1
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if single else None
        try:
            while epoch < self.config.num_epochs:
                state, stats = self.train_epoch(state, epoch, start_step)
                if stats.stopped_at is not None:
                    self.check_finite(state)
                    self.save(state, epoch, stats.stopped_at, best, None, stats.partial)
                    ckpt.wait_for_saves(self.manager)
                    log.warning("preempted: checkpoint saved at epoch %d step %d; rerun the "
                                "same command to resume", epoch + 1, stats.stopped_at)
                    return {"status": "preempted", "epoch": epoch + 1,
                            "step_in_epoch": stats.stopped_at}
                start_step, epoch = 0, epoch + 1
                state, evaluation, decisions = self.end_epoch(state, epoch)
                best = max(best, evaluation["test_top1"])
                self.check_finite(state)
                self.save(state, epoch, 0, best, evaluation["test_top1"])
                self.log_epoch(state, epoch, stats, evaluation, decisions, tb)
                if self.preempted:  # the stop fell on an epoch's last step: saved just now
                    ckpt.wait_for_saves(self.manager)
                    log.warning("preempted: checkpoint saved at the end of epoch %d; rerun the "
                                "same command to resume", epoch)
                    return {"status": "preempted", "epoch": epoch}
            ckpt.wait_for_saves(self.manager)
            return self.finish(state, wall_start, tb)
        except BaseException:
            ckpt.wait_for_saves(self.manager, raise_errors=False)  # bounded; the error goes on
            raise
        finally:
            if single:
                signal.signal(signal.SIGTERM, old_handler)
            self.profiler.stop()
            tb.close()

    def end_epoch(self, state, epoch_done: int):
        """Evaluate, let the controller act, evaluate again if the structure changed."""
        loss, top1 = self.exp.evaluate(self.exp.model, variables_of(state), "eval")
        evaluation = {"test_loss": loss, "test_top1": top1, "test_top1_before_adjust": top1}
        host = to_host(state)
        outcome = self.ctrl.after_epoch(epoch_done, variables_of(host), mean_scores(host),
                                        int(host["step"]))
        if outcome is None:
            return state, evaluation, []
        for record in outcome.decisions:
            log.info("%s", describe_decision(record))
            if self.exp.is_main:
                self.structure_log.append(record)
        if not outcome.plan.adjust:  # recalibration only: scores keep accumulating
            return self.place.replicate({**host, **outcome.variables}), evaluation, []
        opt_state, report = remap_opt_state(self.tx, host["opt_state"],
                                            outcome.variables["params"])
        state = self.place.replicate(self.new_state(outcome.variables, opt_state, host["step"]))
        if outcome.structure_changed:
            log.info("optimizer state remapped: %d kept, %d fresh, %d dropped", report["kept"],
                     report["fresh"], report["dropped"])
            for name in ("train", "eval"):  # old structures do not come back: free them
                self.exp.steps.drop(name)
            self.prefetch_programs(state)
            loss, top1 = self.exp.evaluate(self.exp.model, variables_of(state), "eval")
            evaluation.update(test_loss=loss, test_top1=top1)
        return state, evaluation, outcome.decisions

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.preempted = True

    def preemption_reached(self, step: int) -> bool:
        """Stop after global step `step`? Every host of a pod answers the same.

        Multi-host: orbax's `reached_preemption` (jax's preemption sync point:
        a SIGTERM on any host picks one step for all); it must be asked at
        every step. Single process: our SIGTERM handler's flag.
        """
        if not self.preempted and jax.process_count() > 1:
            self.preempted = bool(self.manager.reached_preemption(step))
        return self.preempted

    def check_finite(self, state):
        host = to_host(state["params"])
        bad = [dotted(tuple(getattr(k, "key", k) for k in path))
               for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]
               if not np.all(np.isfinite(leaf))]
        if bad:
            raise TrainingError(
                f"non-finite parameters after training ({', '.join(bad[:5])}...). "
                f"{self.nan_advice()}")

    def nan_advice(self) -> str:
        """What is kept and what to try after a non-finite loss or parameters."""
        if self.manager.latest_step() is None:
            kept = "No checkpoint was saved yet (the rerun starts afresh)."
        else:
            kept = f"The last good checkpoint in {self.manager.directory} is kept."
        tries = ["a lower optim.lr"]
        if not self.config.optim.grad_clip_norm:
            tries.append("optim.grad_clip_norm=1.0")
        if self.config.model.dtype != "float32":
            tries.append("model.dtype=float32")
        return f"{kept} Try {' or '.join(tries)}, then rerun the same command."

    def train_epoch(self, state, epoch: int, start_step: int):
        """Train from `start_step` to the epoch's end (or a preemption): (state, EpochStats)."""
        cfg, spe = self.config, self.exp.inp.steps_per_epoch
        epoch_start, compile_before = time.perf_counter(), self.exp.steps.compile_seconds
        compiled, sums, seen, rate = None, None, 0, 0.0
        if start_step and self.carried:  # resumed mid-epoch: the sums of the steps before
            c, self.carried = self.carried, None
            sums = {"loss": np.float32(c["loss_sum"]), "correct": np.int32(c["correct"]),
                    "lr": np.float32(0.0)}
            seen = int(c["seen"])
        timer_start, timer_images = time.perf_counter(), 0
        window = None  # (sums, seen, time) at the last progress line
        for i, batch in enumerate(self.exp.inp.train_iter(epoch, start_step=start_step)):
            step_in_epoch, global_step = start_step + i, epoch * spe + start_step + i
            images, labels = self.place.shard_batch((batch["image"], batch["label"]))
            rng = jax.random.fold_in(self.exp.base_key, 1_000_000 + global_step)
            if compiled is None:
                compiled = self.compiled_train_step(state, images, labels, rng)
                timer_start = time.perf_counter()
                window = (None, 0, timer_start)
            self.profiler.before(global_step + 1)
            state, metrics = compiled(state, images, labels, rng)
            self.profiler.after(global_step + 1, metrics)
            ckpt.check_saves(self.manager)  # a failed background save stops the run now
            sums = metrics if sums is None else {
                "loss": sums["loss"] + metrics["loss"], "lr": metrics["lr"],
                "correct": sums["correct"] + metrics["correct"]}
            seen, timer_images = seen + 1, timer_images + cfg.batch_size
            last = step_in_epoch == spe - 1
            stop = self.preemption_reached(global_step + 1)
            if (global_step + 1) % cfg.log_every_steps == 0 or last or stop:
                host_sums = to_host(sums)
                rate = timer_images / max(time.perf_counter() - timer_start, 1e-9)
                self.log_progress(host_sums, seen, epoch, step_in_epoch, rate)
                window = epoch_report.step_scalars(self.tb, global_step + 1, host_sums, seen,
                                                   window, cfg.batch_size)
            if stop and not last:
                return state, epoch_report.epoch_stats(
                    cfg.batch_size, sums, seen, rate, epoch_start, compile_before,
                    stopped_at=step_in_epoch + 1)
        return state, epoch_report.epoch_stats(cfg.batch_size, sums, seen, rate, epoch_start,
                                               compile_before)

    def log_progress(self, host_sums, seen: int, epoch: int, step_in_epoch: int, rate: float):
        spe = self.exp.inp.steps_per_epoch
        global_step = epoch * spe + step_in_epoch
        mean_loss = float(host_sums["loss"]) / seen
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"loss became {mean_loss} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                f"(global step {global_step + 1}); stopping. {self.nan_advice()}")
        remaining = (self.total_steps - global_step - 1) * self.config.batch_size / max(rate, 1e-9)
        log.info("epoch %d step %d/%d loss %.4f top1 %.3f lr %.4g %.0f img/s ETA %s",
                 epoch + 1, step_in_epoch + 1, spe, mean_loss,
                 float(host_sums["correct"]) / (seen * self.config.batch_size),
                 float(host_sums["lr"]), rate, format_eta(remaining))

    def log_epoch(self, state, epoch, stats: EpochStats, evaluation: dict, decisions, tb):
        variables = to_host(variables_of(state))
        params_n = models.count_params(variables["params"])
        macs = models.count_macs(self.exp.model, variables, self.exp.image_shape)
        seconds = time.perf_counter() - stats.started
        compile_s = self.exp.steps.compile_seconds - stats.compile_before
        record = {
            "epoch": epoch, **stats.record(), **evaluation, "params": params_n, "macs": macs,
            "compile_s": compile_s, "epoch_s": seconds,
            "grown_slots": len(structure_of(variables["params"])),
            "structure_changes": len(decisions),
        }
        log.info("epoch %d/%d train loss %.4f top1 %.4f | test loss %.4f top1 %.4f | params %s "
                 "MACs %s | %.1fs (compile %.1fs)", epoch, self.config.num_epochs,
                 stats.train_loss, stats.train_top1, evaluation["test_loss"],
                 evaluation["test_top1"], human(params_n), human(macs), seconds, compile_s)
        if self.exp.is_main:
            self.metrics_log.append(record)
            epoch_report.epoch_scalars(tb, record, decisions, self.exp.inp.steps_per_epoch)

    def finish(self, state, wall_start, tb) -> dict:
        variables = to_host(variables_of(state))
        _, test_top1 = self.exp.evaluate(self.exp.model, self.place.replicate(variables), "eval")
        fused = self.exp.export_fused(variables)
        if abs(fused["fused_test_top1"] - test_top1) > 0.001:
            log.warning("FUSED ACCURACY DIFFERS: fused %.4f vs unfused %.4f (more than 0.1 "
                        "point); please report this", fused["fused_test_top1"], test_top1)
        record = {"final": True, "test_top1": test_top1,
                  **{k: v for k, v in fused.items() if k != "fused_dir"},
                  "wall_s": time.perf_counter() - wall_start,
                  **self.exp.steps.clock.since(self.compile_mark),
                  "structure": structure_of(variables["params"])}
        log.info("final: test top1 %.4f, fused test top1 %.4f, deploy params %s MACs %s",
                 test_top1, fused["fused_test_top1"], human(fused["fused_params"]),
                 human(fused["fused_macs"]))
        if self.exp.is_main:
            self.metrics_log.append(record)
            tb.scalars(self.total_steps, {"final/test_top1": test_top1,
                                          "final/fused_test_top1": fused["fused_test_top1"]})
            plot_structure(self.workdir)
        return {"status": "done", **record}


def run(config, workdir: str) -> dict:
    """Train (or resume) the experiment `config` in `workdir`, holding the workdir's lock.

    Config, devices, model and data are checked before anything is written.
    """
    validate_config(config)
    check_workdir(workdir)
    use_persistent_cache(config.compilation_cache_dir)
    exp = Experiment(config, workdir)
    with lock_workdir(exp.workdir) as lock:
        return Trainer(config, workdir, experiment=exp, run_id=lock.run_id).run()
