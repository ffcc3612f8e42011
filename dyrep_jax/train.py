"""The training loop: data + model + optimizer + controller, sharded, checkpointed.

Flow per epoch: train steps (one compiled program per structure) -> eval ->
maybe adjust the structure (controller decides, `rep` transforms, optimizer
state remapped) -> checkpoint -> one metrics line. At the end the network is
fused into the plain deploy network, evaluated, and saved in DIR/fused/.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import models
from dyrep_jax.config_base import base_config
from dyrep_jax.data import build_input
from dyrep_jax.dyrep import (
    ControllerConfig,
    adjust,
    calibrate_block,
    dbb_initial_branches,
    eligible_slots,
)
from dyrep_jax.optim import cosine_schedule, make_optimizer, remap_opt_state
from dyrep_jax.rep.introspect import slot_geometries
from dyrep_jax.rep.tree import dotted, structure_of
from dyrep_jax.reporting import (
    JsonlLog,
    TensorBoard,
    describe_decision,
    format_eta,
    human,
    plot_structure,
)
from dyrep_jax.steps import (
    StepCache,
    make_bn_recalibration_step,
    make_eval_step,
    make_prepare_images,
    make_train_step,
)

log = logging.getLogger("dyrep_jax")


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, bad setup); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- config


GROUP_TYPES = (Mapping, ml_collections.ConfigDict)


def validate_config(config, reference=None, prefix=""):
    """Every field must exist in `base_config()` with a compatible type."""
    reference = base_config() if reference is None else reference
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ValueError(
                f"unknown config field '{name}'; valid fields here: "
                f"{', '.join(sorted(reference.keys()))}"
            )
        value, ref = config[key], reference[key]
        if isinstance(ref, GROUP_TYPES):
            if not isinstance(value, GROUP_TYPES):
                raise ValueError(f"config field '{name}' must be a group of fields")
            validate_config(value, ref, prefix=f"{name}.")
    mode = config.get("dyrep", {}).get("mode") if prefix == "" else None
    if mode is not None:
        ControllerConfig(mode=mode, metric=config.dyrep.metric)
    if prefix == "":
        if config.model.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype}")
        if config.batch_size < 1 or config.num_epochs < 1:
            raise ValueError("batch_size and num_epochs must be positive")


def controller_config(config) -> ControllerConfig:
    d = config.dyrep
    return ControllerConfig(mode=d.mode, metric=d.metric, grow_topk=d.grow_topk,
                            calib_batches=d.calib_batches,
                            dep_std_threshold=d.dep_std_threshold,
                            dep_abs_threshold=d.dep_abs_threshold)


# ----------------------------------------------------------------------------- sharding


def to_host(tree):
    """Local numpy copy of a (replicated) device tree, valid on every host."""

    def one(a):
        if isinstance(a, jax.Array):
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree_util.tree_map(one, tree)


class Placement:
    """Mesh over the data axis: state replicated, batches split across devices/hosts."""

    def __init__(self, num_devices: int = 0):
        devices = jax.devices()
        if num_devices:
            if jax.process_count() > 1:
                raise ValueError("num_devices applies to single-host runs only")
            devices = devices[:num_devices]
        self.mesh = Mesh(np.array(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch = NamedSharding(self.mesh, P("data"))
        self.num_devices = len(devices)

    def replicate(self, tree):
        return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a), self.replicated),
                                      tree)

    def shard_batch(self, local):
        """Process-local rows -> one global array sharded over the data axis."""
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self.batch, np.asarray(a)), local)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Holds what one run needs; `run()` trains to the end (resuming if possible)."""

    def __init__(self, config, workdir: str):
        validate_config(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.ctrl = controller_config(config)
        self.place = Placement(config.get("num_devices", 0))
        if config.batch_size % self.place.num_devices or \
                config.eval_batch_size % self.place.num_devices:
            raise ValueError(
                f"batch_size ({config.batch_size}) and eval_batch_size "
                f"({config.eval_batch_size}) must be divisible by the {self.place.num_devices} "
                "devices")
        d = config.data
        self.inp = build_input(
            d.dataset, data_dir=d.data_dir or None, global_batch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            augment=d.augment, image_size=d.image_size or None,
            max_train_examples=d.max_train_examples or None,
            max_test_examples=d.max_test_examples or None,
            color_jitter=d.color_jitter, random_erasing=d.random_erasing,
            host_workers=d.host_workers,
            num_classes=config.model.num_classes or None)
        if self.inp.steps_per_epoch < 1:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {self.inp.num_train} "
                             "training examples")
        self.num_classes = config.model.num_classes or self.inp.num_classes
        self.dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
        m = config.model
        self.model = models.create_model(m.name, num_classes=self.num_classes, width=m.width,
                                         dtype=self.dtype,
                                         with_bn_after_3x3=self.ctrl.mode != "dbb")
        self.deploy_model = models.create_model(m.name, num_classes=self.num_classes,
                                                width=m.width, dtype=self.dtype, deploy=True)
        o = config.optim
        spe = self.inp.steps_per_epoch
        self.total_steps = spe * config.num_epochs
        self.schedule = cosine_schedule(o.lr, self.total_steps, round(o.warmup_epochs * spe),
                                        o.min_lr)
        self.tx = make_optimizer(name=o.name, schedule=self.schedule, momentum=o.momentum,
                                 nesterov=o.nesterov, weight_decay=o.weight_decay,
                                 decay_bn_and_bias=o.decay_bn_and_bias,
                                 grad_clip_norm=o.grad_clip_norm)
        self.mean = jnp.asarray(self.inp.mean, jnp.float32)
        self.std = jnp.asarray(self.inp.std, jnp.float32)
        self.steps = StepCache()
        self.metrics_log = JsonlLog(os.path.join(self.workdir, "metrics.jsonl"))
        self.structure_log = JsonlLog(os.path.join(self.workdir, "structure.jsonl"))
        self.manager = ckpt.make_manager(os.path.join(self.workdir, "checkpoints"),
                                         keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
        self.image_shape = tuple(self.inp.image_shape)
        self.base_key = jax.random.PRNGKey(config.seed)
        self.preempted = False
        self.is_main = jax.process_index() == 0

    # ------------------------------------------------------------------ state

    def fresh_variables(self):
        rule = dbb_initial_branches if self.ctrl.mode == "dbb" else None
        key = jax.random.fold_in(self.base_key, 0)
        return models.init_variables(self.model, key, self.image_shape, initial_branches=rule)

    def geometries(self, variables):
        x = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
        return {k: v.geometry for k, v in slot_geometries(self.model, variables, x).items()}

    def host_state(self, variables, opt_state, step):
        eligible = eligible_slots(variables["params"]) if self.ctrl.grows else []
        return {
            "params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": opt_state, "scores": np.zeros((len(eligible),), np.float32),
            "score_steps": np.zeros((), np.int32), "step": np.asarray(step, np.int32),
        }

    def measure(self, variables):
        params = models.count_params(variables["params"])
        macs = models.count_macs(self.model, variables, self.image_shape)
        return params, macs

    # ------------------------------------------------------------------ steps

    def compiled_train_step(self, state, images, labels, rng):
        eligible = eligible_slots(state["params"]) if self.ctrl.grows else []
        fn = make_train_step(
            self.model, self.tx, self.schedule, eligible=eligible, metric=self.ctrl.metric,
            num_classes=self.num_classes, label_smoothing=self.config.optim.label_smoothing,
            mean=self.mean, std=self.std, augment_kind=self.inp.device_augment, dtype=self.dtype,
            fail_at_step=self.config.debug_fail_at_step)
        r, b = self.place.replicated, self.place.batch
        return self.steps.get("train", fn, (state, images, labels, rng),
                              in_shardings=(r, b, b, r), out_shardings=(r, r), donate=(0,))

    def evaluate(self, model, variables, name):
        fn = make_eval_step(model, num_classes=self.num_classes, mean=self.mean, std=self.std,
                            dtype=self.dtype)
        totals, compiled = None, None
        for batch in self.inp.eval_iter():
            args = (variables, *self.place.shard_batch(
                (batch["image"], batch["label"], batch["mask"])))
            if compiled is None:
                r, b = self.place.replicated, self.place.batch
                compiled = self.steps.get(name, fn, args, in_shardings=(r, b, b, b),
                                          out_shardings=r)
            out = compiled(*args)
            totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
        totals = to_host(totals)
        count = max(float(totals["count"]), 1.0)
        return float(totals["loss"]) / count, float(totals["correct"]) / count

    def calibration_batches(self, epoch):
        prepare = jax.jit(make_prepare_images(self.mean, self.std, self.inp.device_augment,
                                              self.dtype))
        n = self.ctrl.calib_batches
        key = jax.random.fold_in(self.base_key, 10_000 + epoch)

        def batches():
            for i, batch in enumerate(self.inp.train_iter(epoch)):
                if i >= n:
                    return
                images = self.place.shard_batch(batch["image"])
                yield prepare(jax.random.fold_in(key, i), images)

        return batches

    def recalibrate_all_bn(self, variables, epoch):
        fn = jax.jit(make_bn_recalibration_step(self.model))
        total, count = None, 0
        for images in self.calibration_batches(epoch)():
            stats = fn(variables, images)
            total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
            count += 1
        if count:
            variables = {**variables, "batch_stats": to_host(
                jax.tree_util.tree_map(lambda t: t / count, total))}
        return variables

    # ------------------------------------------------------------------ structure

    def maybe_adjust(self, state, epoch_done: int):
        """Adjust after `epoch_done` epochs when the schedule says so; returns new state."""
        d = self.config.dyrep
        due = (self.ctrl.grows and epoch_done % d.adjust_interval == 0
               and epoch_done <= d.max_adjust_epochs and epoch_done < self.config.num_epochs)
        if not due and not d.recal_bn_every_epoch:
            return state, []
        host = to_host(state)
        variables = {"params": host["params"], "batch_stats": host["batch_stats"]}
        decisions = []
        if due:
            start = time.perf_counter()
            paths = eligible_slots(variables["params"])
            steps = max(int(host["score_steps"]), 1)
            scores = host["scores"] / steps
            key = jax.random.fold_in(self.base_key, 20_000 + epoch_done)
            geometries = self.geometries(variables)

            def calibrate(current, path):
                return to_host(calibrate_block(self.model, self.place.replicate(current), path,
                                               geometries, self.calibration_batches(epoch_done)()))

            variables, decisions = adjust(key, variables, geometries, scores, paths, self.ctrl,
                                          calibrate, grow=self.ctrl.grows, cut=self.ctrl.cuts)
            params_n, macs = self.measure(variables)
            for dcs in decisions:
                dcs.update(epoch=epoch_done, step=int(host["step"]), params=params_n, macs=macs)
                log.info("%s", describe_decision(dcs))
                if self.is_main:
                    self.structure_log.append(dcs)
            log.info("adjustment after epoch %d took %.1fs", epoch_done,
                     time.perf_counter() - start)
        if d.recal_bn_every_epoch:
            variables = self.recalibrate_all_bn(self.place.replicate(variables), epoch_done)
        opt_state, report = remap_opt_state(self.tx, host["opt_state"], variables["params"])
        if decisions:
            log.info("optimizer state remapped: %d kept, %d fresh, %d dropped", report["kept"],
                     report["fresh"], report["dropped"])
            for name in ("train", "eval"):  # old structures do not come back: free them
                self.steps.drop(name)
        new = self.host_state(variables, opt_state, host["step"])
        if not due:  # recalibration only: scores keep accumulating
            new["scores"], new["score_steps"] = host["scores"], host["score_steps"]
        return self.place.replicate(new), decisions

    # ------------------------------------------------------------------ checkpoints

    def save(self, state, epoch: int, step_in_epoch: int, best: float, test_top1):
        host = to_host(state)
        ckpt_state = {k: host[k] for k in ("params", "batch_stats", "scores", "score_steps",
                                           "step")}
        if ckpt_state["scores"].size == 0:  # orbax cannot store empty arrays (no eligible slots)
            del ckpt_state["scores"]
        meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "best_test_top1": best,
                "name": self.config.name, "model": self.config.model.name,
                "structure": structure_of(host["params"])}
        ckpt.save(self.manager, int(host["step"]), ckpt_state, host["opt_state"], meta,
                  test_top1)

    def restore(self):
        found = ckpt.restore_latest(self.manager, self.tx.init)
        if found is None:
            return None
        step, state, opt, meta = found
        state = dict(state)
        state["opt_state"] = opt
        if "scores" not in state:
            state["scores"] = np.zeros((0,), np.float32)
        log.info("resumed from step %d (epoch %d, step %d in epoch); %d grown slots", step,
                 meta["epoch"], meta["step_in_epoch"], len(meta.get("structure", {})))
        return self.place.replicate(state), meta

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        cfg = self.config
        wall_start = time.perf_counter()
        restored = self.restore()
        if restored is None:
            variables = self.fresh_variables()
            state = self.place.replicate(
                self.host_state(variables, self.tx.init(variables["params"]), 0))
            epoch, start_step, best = 0, 0, -1.0
            for f in (self.metrics_log, self.structure_log):
                if self.is_main and os.path.exists(f.path):
                    os.remove(f.path)
        else:
            state, meta = restored
            epoch, start_step, best = meta["epoch"], meta["step_in_epoch"], meta["best_test_top1"]
            if self.is_main:
                self.metrics_log.truncate_after_epoch(epoch)
                self.structure_log.truncate_after_epoch(epoch)
        tb = TensorBoard(os.path.join(self.workdir, "tb"), enabled=self.is_main)
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while epoch < cfg.num_epochs:
                state, done = self.train_epoch(state, epoch, start_step, tb)
                if not done:  # preempted: checkpoint saved mid-epoch
                    return {"status": "preempted", "epoch": epoch}
                start_step = 0
                epoch += 1
                test_loss, test_top1 = self.evaluate(self.model, state_variables(state), "eval")
                best = max(best, test_top1)
                state, decisions = self.maybe_adjust(state, epoch)
                self.check_finite(state)
                self.save(state, epoch, 0, best, test_top1)
                self.log_epoch(state, epoch, test_loss, test_top1, decisions, tb)
            self.manager.wait_until_finished()
            return self.finish(state, wall_start, tb)
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            self.manager.wait_until_finished()
            tb.close()

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.preempted = True

    def check_finite(self, state):
        host = to_host(state["params"])
        bad = [dotted(tuple(getattr(k, "key", k) for k in path))
               for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]
               if not np.all(np.isfinite(leaf))]
        if bad:
            raise TrainingError(
                f"non-finite parameters after training ({', '.join(bad[:5])}...); the last good "
                f"checkpoint in {self.manager.directory} is kept. Lower optim.lr or enable "
                "optim.grad_clip_norm.")

    def train_epoch(self, state, epoch: int, start_step: int, tb):
        cfg = self.config
        spe = self.inp.steps_per_epoch
        compiled, sums, seen = None, None, 0
        self._epoch_start = time.perf_counter()
        timer_start, timer_images = time.perf_counter(), 0
        self._epoch_compile = self.steps.compile_seconds
        for i, batch in enumerate(self.inp.train_iter(epoch, start_step=start_step)):
            step_in_epoch = start_step + i
            images, labels = self.place.shard_batch((batch["image"], batch["label"]))
            global_step = epoch * spe + step_in_epoch
            rng = jax.random.fold_in(self.base_key, 1_000_000 + global_step)
            if compiled is None:
                compiled = self.compiled_train_step(state, images, labels, rng)
                timer_start = time.perf_counter()
            state, metrics = compiled(state, images, labels, rng)
            sums = metrics if sums is None else {
                "loss": sums["loss"] + metrics["loss"], "correct": sums["correct"] +
                metrics["correct"], "lr": metrics["lr"]}
            seen += 1
            timer_images += cfg.batch_size
            last = step_in_epoch == spe - 1
            if (global_step + 1) % cfg.log_every_steps == 0 or last or self.preempted:
                host = to_host(sums)
                mean_loss = float(host["loss"]) / seen
                if not math.isfinite(mean_loss):
                    raise TrainingError(
                        f"loss became {mean_loss} at epoch {epoch + 1}, step {step_in_epoch + 1} "
                        f"(global step {global_step + 1}); stopping. The last good checkpoint "
                        f"in {self.manager.directory} is kept. Try a lower optim.lr, "
                        "optim.grad_clip_norm, or model.dtype=float32.")
                elapsed = time.perf_counter() - timer_start
                rate = timer_images / max(elapsed, 1e-9)
                remaining = (self.total_steps - global_step - 1) * cfg.batch_size / max(rate, 1e-9)
                log.info("epoch %d step %d/%d loss %.4f top1 %.3f lr %.4g %.0f img/s ETA %s",
                         epoch + 1, step_in_epoch + 1, spe, mean_loss,
                         float(host["correct"]) / (seen * cfg.batch_size), float(host["lr"]),
                         rate, format_eta(remaining))
                self._last_rate = rate
            if self.preempted and not last:
                self.check_finite(state)
                self.save(state, epoch, step_in_epoch + 1, -1.0, None)
                self.manager.wait_until_finished()
                log.warning("preempted: checkpoint saved at epoch %d step %d; rerun the same "
                            "command to resume", epoch + 1, step_in_epoch + 1)
                return state, False
        host = to_host(sums) if sums is not None else {"loss": 0.0, "correct": 0, "lr": 0.0}
        self._epoch_train = {
            "train_loss": float(host["loss"]) / max(seen, 1),
            "train_top1": float(host["correct"]) / max(seen * cfg.batch_size, 1),
            "lr": float(host["lr"]),
        }
        return state, True

    def log_epoch(self, state, epoch, test_loss, test_top1, decisions, tb):
        variables = to_host(state_variables(state))
        params_n, macs = self.measure(variables)
        seconds = time.perf_counter() - self._epoch_start
        record = {
            "epoch": epoch, **self._epoch_train, "test_loss": test_loss, "test_top1": test_top1,
            "params": params_n, "macs": macs, "img_per_s": getattr(self, "_last_rate", 0.0),
            "compile_s": self.steps.compile_seconds - self._epoch_compile,
            "epoch_s": seconds, "grown_slots": len(structure_of(variables["params"])),
            "structure_changes": len(decisions),
        }
        log.info("epoch %d/%d train loss %.4f top1 %.4f | test loss %.4f top1 %.4f | params %s "
                 "MACs %s | %.1fs (compile %.1fs)", epoch, self.config.num_epochs,
                 record["train_loss"], record["train_top1"], test_loss, test_top1,
                 human(params_n), human(macs), seconds, record["compile_s"])
        if self.is_main:
            self.metrics_log.append(record)
            tb.scalars(epoch, record)

    def finish(self, state, wall_start, tb) -> dict:
        variables = to_host(state_variables(state))
        _, test_top1 = self.evaluate(self.model, self.place.replicate(variables), "eval")
        fused = models.fuse_network(variables)
        fused_rep = self.place.replicate(fused)
        _, fused_top1 = self.evaluate(self.deploy_model, fused_rep, "eval_fused")
        fused_params = models.count_params(fused)
        fused_macs = models.count_macs(self.deploy_model, fused, self.image_shape)
        if abs(fused_top1 - test_top1) > 0.001:
            log.warning("FUSED ACCURACY DIFFERS: fused %.4f vs unfused %.4f (more than 0.1 "
                        "point); please report this", fused_top1, test_top1)
        arch = {"model": self.config.model.name, "num_classes": self.num_classes,
                "width": self.config.model.width, "dtype": self.config.model.dtype,
                "image_shape": list(self.image_shape), "mean": np.asarray(self.mean).tolist(),
                "std": np.asarray(self.std).tolist(), "params": fused_params, "macs": fused_macs,
                "test_top1": fused_top1, "name": self.config.name}
        ckpt.save_fused(os.path.join(self.workdir, "fused"), fused, arch,
                        write_arch=self.is_main)  # every host joins orbax's save
        record = {"final": True, "test_top1": test_top1, "fused_test_top1": fused_top1,
                  "fused_params": fused_params, "fused_macs": fused_macs,
                  "wall_s": time.perf_counter() - wall_start,
                  "compile_s_total": self.steps.compile_seconds,
                  "structure": structure_of(variables["params"])}
        log.info("final: test top1 %.4f, fused test top1 %.4f, deploy params %s MACs %s; "
                 "deploy weights in %s", test_top1, fused_top1, human(fused_params),
                 human(fused_macs), os.path.join(self.workdir, "fused"))
        if self.is_main:
            self.metrics_log.append(record)
            tb.scalars(self.config.num_epochs, {"final/fused_test_top1": fused_top1})
            plot_structure(self.workdir)
        return {"status": "done", **record}


def state_variables(state):
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def run(config, workdir: str) -> dict:
    """Train (or resume) the experiment `config` in `workdir`."""
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    return Trainer(config, workdir).run()
