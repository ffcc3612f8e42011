"""What training, evaluation and export share: a checked config, devices, models, data, eval.

`Experiment(config, workdir)` builds no optimizer and iterates no training
data, so `--mode=eval/export` use it alone; the `Trainer` adds the optimizer,
the controller and the loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import models, paths, serving
from dyrep_jax.config_base import base_config
from dyrep_jax.data import build_input
from dyrep_jax.dyrep import ControllerConfig
from dyrep_jax.errors import ConfigError, WorkdirError
from dyrep_jax.identity import check_identity, run_identity, run_settings
from dyrep_jax.reporting import human, parse_profile_steps
from dyrep_jax.steps import StepCache, batch_specs, make_eval_step

log = logging.getLogger("dyrep_jax")

GROUP_TYPES = (Mapping, ml_collections.ConfigDict)


# numeric fields: (field, test, what the value must be)
_POSITIVE, _NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
_AT_LEAST_1, _FRACTION = (lambda v: v >= 1, ">= 1"), (lambda v: 0 <= v <= 1, "in [0, 1]")
NUMERIC_RULES = [
    ("model.width", *_POSITIVE), ("model.num_classes", *_NON_NEGATIVE),
    ("model.bn_group_size", *_NON_NEGATIVE), ("data.image_size", *_NON_NEGATIVE),
    ("data.max_train_examples", *_NON_NEGATIVE), ("data.max_test_examples", *_NON_NEGATIVE),
    ("data.color_jitter", *_NON_NEGATIVE), ("data.random_erasing", *_FRACTION),
    ("data.host_workers", *_NON_NEGATIVE), ("batch_size", *_AT_LEAST_1),
    ("eval_batch_size", *_AT_LEAST_1), ("num_epochs", *_AT_LEAST_1),
    ("optim.lr", *_POSITIVE), ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", *_NON_NEGATIVE), ("optim.warmup_epochs", *_NON_NEGATIVE),
    ("optim.warmup_lr", *_NON_NEGATIVE), ("optim.min_lr", *_NON_NEGATIVE),
    ("optim.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.grad_clip_norm", *_NON_NEGATIVE), ("dyrep.adjust_interval", *_AT_LEAST_1),
    ("dyrep.max_adjust_epochs", *_NON_NEGATIVE), ("dyrep.grow_topk", *_NON_NEGATIVE),
    ("dyrep.calib_batches", *_AT_LEAST_1), ("dyrep.dep_std_threshold", *_NON_NEGATIVE),
    ("dyrep.dep_abs_threshold", *_NON_NEGATIVE), ("dyrep.recal_bn_batches", *_AT_LEAST_1),
    ("checkpoint.keep", *_AT_LEAST_1), ("num_devices", *_NON_NEGATIVE),
    ("log_every_steps", *_AT_LEAST_1), ("debug_fail_at_step", lambda v: v >= -1, ">= -1"),
]


def validate_config(config, reference=None, prefix=""):
    """Every field must exist in `base_config()` with a compatible type and a usable value.

    Runs before anything is compiled or written; raises ConfigError naming the field.
    """
    reference = base_config() if reference is None else reference
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(
                f"unknown config field '{name}'; valid fields here: "
                f"{', '.join(sorted(reference.keys()))}")
        value, ref = config[key], reference[key]
        if isinstance(ref, GROUP_TYPES):
            if not isinstance(value, GROUP_TYPES):
                raise ConfigError(f"config field '{name}' must be a group of fields")
            validate_config(value, ref, prefix=f"{name}.")
    if prefix == "":
        validate_values(config)


def _field(config, dotted_name: str):
    node = config
    for part in dotted_name.split("."):
        node = node[part]
    return node


def validate_values(config) -> None:
    """Ranges of the numeric fields, names (model, mode, dtype), and the device count."""
    for name, ok, what in NUMERIC_RULES:
        value = _field(config, name)
        if not isinstance(value, (int, float)) or not ok(value):
            raise ConfigError(f"config field '{name}' must be {what}, got {value!r}")
    try:
        ControllerConfig.from_config(config)  # mode, metric, interval
    except ValueError as exc:
        raise ConfigError(f"dyrep: {exc}") from exc
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype}")
    if config.model.name not in models.MODEL_NAMES:
        raise ConfigError(f"unknown model.name '{config.model.name}'; valid: "
                          f"{', '.join(models.MODEL_NAMES)}")
    if config.num_devices > jax.local_device_count():
        raise ConfigError(f"num_devices={config.num_devices} but this host has "
                          f"{jax.local_device_count()} devices; use 0 (all) or fewer")
    try:
        parse_profile_steps(config.profile_steps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_workdir(workdir) -> None:
    """Refuse a workdir that is a file (before anything is created)."""
    if os.path.isfile(os.fspath(workdir)):
        raise WorkdirError(f"--workdir {workdir} is a file; expected a directory (new or an "
                           "earlier run's)")


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
                raise ConfigError("num_devices applies to single-host runs only; use 0")
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

    def check_divides(self, *sizes):
        if any(s % self.num_devices for s in sizes):
            raise ConfigError(
                f"batch_size and eval_batch_size ({', '.join(map(str, sizes))}) must be "
                f"divisible by the {self.num_devices} devices")


def open_input(config, place: Placement):
    d = config.data
    inp = build_input(
        d.dataset, data_dir=d.data_dir or None, global_batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        augment=d.augment, image_size=d.image_size or None,
        max_train_examples=d.max_train_examples or None,
        max_test_examples=d.max_test_examples or None,
        color_jitter=d.color_jitter, random_erasing=d.random_erasing,
        host_workers=d.host_workers, num_classes=config.model.num_classes or None)
    if inp.steps_per_epoch < 1:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {inp.num_train} "
                         "training examples")
    return inp


class Experiment:
    """Config, devices, input, the training and deploy models, and evaluation."""

    def __init__(self, config, workdir: str):
        validate_config(config)
        check_workdir(workdir)
        self.config = config
        self.workdir = paths.as_path(workdir)  # local or gs://...; created by the run's lock
        self.place = Placement(config.get("num_devices", 0))
        self.place.check_divides(config.batch_size, config.eval_batch_size)
        self.inp = open_input(config, self.place)
        self.num_classes = config.model.num_classes or self.inp.num_classes
        self.dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
        self.with_bn_after_3x3 = config.dyrep.mode != "dbb"
        m = config.model
        self.model = models.create_model(m.name, num_classes=self.num_classes, width=m.width,
                                         dtype=self.dtype,
                                         with_bn_after_3x3=self.with_bn_after_3x3,
                                         bn_group_size=m.bn_group_size)
        self.deploy_model = models.create_model(m.name, num_classes=self.num_classes,
                                                width=m.width, dtype=self.dtype, deploy=True)
        self.mean = jnp.asarray(self.inp.mean, jnp.float32)
        self.std = jnp.asarray(self.inp.std, jnp.float32)
        self.image_shape = tuple(self.inp.image_shape)
        self.steps = StepCache()
        self.base_key = jax.random.PRNGKey(config.seed)
        self.is_main = jax.process_index() == 0

    def identity(self) -> dict:
        """The checkpoint's `identity` record (what defines the network, `identity.py`)."""
        return run_identity(self.config, num_classes=self.num_classes,
                            image_shape=self.image_shape)

    def settings(self) -> dict:
        return run_settings(self.config, steps_per_epoch=self.inp.steps_per_epoch)

    def check_checkpoint(self, meta: dict, resuming: bool) -> None:
        """Refuse a checkpoint of another network (CheckpointError naming the field)."""
        check_identity(meta, self.identity(), self.settings(),
                       self.workdir / "checkpoints", resuming)

    def checkpoint_manager(self):
        c = self.config.checkpoint
        return ckpt.make_manager(self.workdir / "checkpoints", keep=c.keep,
                                 async_save=c.async_save)

    def write_config(self):
        """DIR/config.json: the resolved config of this run (process 0 writes it)."""
        if self.is_main:
            (self.workdir / "config.json").write_text(
                self.config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    def evaluate(self, model, variables, name: str) -> tuple[float, float]:
        """(mean loss, top-1) on the test split; padding rows are masked out."""
        compiled, totals = self.eval_program(model, variables, name, wait=True), None
        for batch in self.inp.eval_iter():
            args = (variables, *self.place.shard_batch(
                (batch["image"], batch["label"], batch["mask"])))
            out = compiled(*args)
            totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
        totals = to_host(totals)
        count = max(float(totals["count"]), 1.0)
        return float(totals["loss"]) / count, float(totals["correct"]) / count

    def eval_program(self, model, variables, name: str, wait: bool = False):
        """The compiled eval step of `model` for `variables`' structure (`wait=False`: start
        compiling it in the background and return its future)."""
        fn = make_eval_step(model, num_classes=self.num_classes, mean=self.mean, std=self.std,
                            dtype=self.dtype)
        r, b = self.place.replicated, self.place.batch
        args = (variables, *batch_specs(self.config.eval_batch_size, self.image_shape, b,
                                        mask=True))
        get = self.steps.get if wait else self.steps.prefetch
        return get(name, fn, args, in_shardings=(r, b, b, b), out_shardings=r)

    def arch(self, **extra) -> dict:
        """This experiment's `arch.json` record (`checkpoint.arch_record`)."""
        m = self.config.model
        return ckpt.arch_record(model=m.name, num_classes=self.num_classes, width=m.width,
                                dtype=m.dtype, image_shape=self.image_shape,
                                with_bn_after_3x3=self.with_bn_after_3x3, mean=self.mean,
                                std=self.std, name=self.config.name, **extra)

    def export_fused(self, variables, **extra) -> dict:
        """Fuse host `variables`, evaluate the deploy network, write DIR/fused/.

        DIR/fused/ holds `params` (orbax), `arch.json` and `model.jaxexport`
        (`serving.write_exported`: the network alone, for serving without this package).
        """
        fused = to_host(models.fuse_network(variables))
        _, fused_top1 = self.evaluate(self.deploy_model, self.place.replicate(fused),
                                      "eval_fused")
        params = models.count_params(fused)
        macs = models.count_macs(self.deploy_model, fused, self.image_shape)
        out = self.workdir / "fused"
        arch = self.arch(params=params, macs=macs, test_top1=fused_top1, **extra)
        ckpt.save_fused(out, fused, arch, write_arch_file=self.is_main)  # all hosts join orbax
        if self.is_main:
            serving.write_exported(out, self.deploy_model, fused, self.image_shape)
        log.info("deploy network (params %s, MACs %s, test top1 %.4f) written to %s",
                 human(params), human(macs), fused_top1, out)
        return {"fused_dir": str(out), "fused_test_top1": fused_top1, "fused_params": params,
                "fused_macs": macs}


def fused_only_dir(workdir):
    """The fused export `--mode=eval` reads when `workdir` has no checkpoints, else None.

    `workdir` may be a run folder with only `fused/` left, or a `fused/` folder itself.
    """
    d = paths.as_path(workdir)
    if (d / "checkpoints").exists():
        return None
    for candidate in (d, d / "fused"):
        if (candidate / ckpt.ARCH_FILE).exists():
            return candidate
    return None


def evaluate_fused_export(config, fused_dir) -> dict:
    """Test loss and top-1 of a fused export, with the deploy network its arch.json names."""
    variables, arch = ckpt.load_fused(fused_dir)
    exp = Experiment(config, fused_dir)
    if arch["num_classes"] != exp.num_classes or tuple(arch["image_shape"]) != exp.image_shape:
        raise ValueError(
            f"{fused_dir} holds a network for {arch['num_classes']} classes of "
            f"{tuple(arch['image_shape'])} images, but the config's data gives "
            f"{exp.num_classes} classes of {exp.image_shape}; pass the config it was trained with")
    model = models.create_model(arch["model"], num_classes=arch["num_classes"],
                                width=arch["width"], deploy=True,
                                dtype=jnp.bfloat16 if arch["dtype"] == "bfloat16" else jnp.float32)
    loss, top1 = exp.evaluate(model, exp.place.replicate(variables), "eval_fused")
    log.info("fused export %s: test top1 %.4f (loss %.4f)", fused_dir, top1, loss)
    return {"fused_dir": str(fused_dir), "fused_test_top1": top1, "fused_test_loss": loss}
