"""Training-step throughput, peak memory and compile time, measured on the real train step.

Runs `dyrep_jax.steps.make_train_step` (device augmentation, saliency scores, optax SGD,
donated state) on synthetic uint8 batches already on the device, so the numbers are what
training gets minus the host input pipeline (see `bench_input.py` for that part).

Modes: `plain` (every slot a conv), `dyrep` (a mid-run structure: every third eligible slot
grown with all allowed branches, then one branch cut from every other grown block), `dbb`
(every 3x3 slot a 4-branch DBB block, no BN after it). Per model it also measures the
compile seconds of the re-jit after one more grow (`regrow`), and eval throughput of the
training network (`infer`, modes plain/dbb) and of the fused deploy network (`fused`).

One JSON line per measurement on stdout, then one `ratios` line per model.

  python experiments/bench_train.py                      # the issue's full set (accelerator)
  python experiments/bench_train.py --models vgg16_cifar --modes plain,dbb --steps 100
  python experiments/bench_train.py --tiny               # small widths, seconds on a CPU

`--isolate` (the default except with --tiny) runs every (model, mode) in its own process,
so that each peak-memory figure belongs to that configuration alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dyrep_jax import models  # noqa: E402
from dyrep_jax.calibration import calibrate_block  # noqa: E402
from dyrep_jax.data.stats import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dyrep_jax.dyrep import eligible_slots  # noqa: E402
from dyrep_jax.models import dbb_initial_branches  # noqa: E402
from dyrep_jax.optim import cosine_schedule, make_optimizer, remap_opt_state  # noqa: E402
from dyrep_jax.rep import allowed_branches, forward_options  # noqa: E402
from dyrep_jax.rep.introspect import slot_geometries  # noqa: E402
from dyrep_jax.rep.network import cut_at, grow_at  # noqa: E402
from dyrep_jax.rep.tree import get_at, is_block_node, structure_of, top_level_slots  # noqa: E402
from dyrep_jax.state import new_train_state  # noqa: E402
from dyrep_jax.steps import (  # noqa: E402
    StepCache,
    make_eval_step,
    make_prepare_images,
    make_train_step,
)

MODES = ("plain", "dyrep", "dbb")
# The settings: model -> (batch, image size, device augmentation, mean, std, wd, nesterov)
SETUPS = {
    "vgg16_cifar": dict(batch=128, size=32, augment="cifar", mean=CIFAR_MEAN, std=CIFAR_STD,
                        weight_decay=1e-4, nesterov=False),
    "resnet18": dict(batch=256, size=224, augment="none", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     weight_decay=1e-4, nesterov=True),
}
TINY = dict(width=0.0625, batch=4, size=32, steps=2, warmup=1)
# CIFAR recipe (reference): 600 epochs of 50k images at batch 128, a grow every 15 epochs
# until epoch 500; used to put compile seconds in proportion to the whole run.
CIFAR_RECIPE_STEPS = 600 * -(-50_000 // 128)
CIFAR_RECIPE_ADJUSTS = 500 // 15


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help=f"comma list of {', '.join(SETUPS)} (default: all; --tiny: VGG)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of plain,dyrep,dbb")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="compute dtype (default bfloat16; --tiny: float32, as CPUs emulate bf16)")
    parser.add_argument("--batch", type=int, default=0, help="override the model's batch")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier")
    parser.add_argument("--image-size", type=int, default=0, help="override the input size")
    parser.add_argument("--tiny", action="store_true", help="tiny widths/batches, 2 timed steps")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one process per (model, mode); default: on unless --tiny")
    parser.add_argument("--no-augment", action="store_true",
                        help="normalize only, no CIFAR crop/flip/cutout (as the bare Flax anchor)")
    parser.add_argument("--blocks", default="fast", choices=("fast", "unshared", "branchwise"),
                        help="block forward: fast (default), fast without the shared 1x1 "
                             "conv in training, or the branchwise reference (what "
                             "share_1x1 and fuse_inference gain)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the regrow compile and the inference measurements")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # MODEL:MODE (child)
    args = parser.parse_args(argv)
    if args.tiny:
        args.width = TINY["width"] if args.width == 1.0 else args.width
        args.batch = args.batch or TINY["batch"]
        args.image_size = args.image_size or TINY["size"]
        args.steps, args.warmup = min(args.steps, TINY["steps"]), min(args.warmup, TINY["warmup"])
    if args.isolate is None:
        args.isolate = not args.tiny
    if args.dtype is None:
        args.dtype = "float32" if args.tiny else "bfloat16"
    if args.models is None:
        args.models = "vgg16_cifar" if args.tiny else ",".join(SETUPS)
    if args.tiny:
        quick_compiles()
    for name in split(args.models):
        if name not in SETUPS:
            parser.error(f"unknown model {name!r} (valid: {', '.join(SETUPS)})")
    for mode in split(args.modes):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r} (valid: {', '.join(MODES)})")
    return args


def quick_compiles() -> None:
    """Cheaper LLVM passes for smoke runs (compile dominates them on a CPU).

    Takes effect because no backend exists yet when the arguments are parsed.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true "
                               "--xla_cpu_use_fusion_emitters=false").strip()


def split(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


# ---------------------------------------------------------------------------- structures


def build(name: str, mode: str, args):
    """(model, variables) of `name` in `mode`; init and grows run as one jitted program."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = models.create_model(name, width=args.width, dtype=dtype,
                                with_bn_after_3x3=mode != "dbb")
    rule = dbb_initial_branches if mode == "dbb" else None
    shape = input_shape(name, args)

    def init(key):
        variables = models.init_variables(model, key, shape, initial_branches=rule)
        return grow_every_third(model, variables, shape) if mode == "dyrep" else variables

    variables = jax.jit(init)(jax.random.PRNGKey(0))
    return model, cut_every_other(variables) if mode == "dyrep" else variables


def input_shape(name: str, args) -> tuple:
    size = args.image_size or SETUPS[name]["size"]
    return (size, size, 3)


def top_geometries(model, variables, shape) -> dict:
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return {p: info.geometry for p, info in slot_geometries(model, variables, x).items()}


def grow_every_third(model, variables, shape):
    """Mid-run structure, part 1: every third eligible slot grown with all allowed branches."""
    params, stats = variables["params"], variables["batch_stats"]
    geoms = top_geometries(model, variables, shape)
    for i, path in enumerate(eligible_slots(params)[1::3]):
        params, stats = grow_at(jax.random.fold_in(jax.random.PRNGKey(1), i), params, stats,
                                path, geoms[path], allowed_branches(geoms[path]))
    return {**variables, "params": params, "batch_stats": stats}


def cut_every_other(variables):
    """Mid-run structure, part 2: one branch cut from every other block, in rotation.

    Eager: a cut looks at BN gammas to pick its exact formula.
    """
    params, stats = variables["params"], variables["batch_stats"]
    blocks = [p for p in top_level_slots(params) if is_block_node(get_at(params, p))]
    for i, path in enumerate(blocks[::2]):
        others = [b for b in get_at(params, path) if b != "kxk"]
        params, stats = cut_at(params, stats, path, [others[i % len(others)]])
    return {**variables, "params": params, "batch_stats": stats}


def next_growable(params) -> tuple | None:
    """The first plain top-level slot that DyRep could grow next."""
    top = set(top_level_slots(params))
    return next((p for p in eligible_slots(params) if p in top), None)


# ---------------------------------------------------------------------------- measurements


class Bench:
    """Everything one model's measurements share: data on device, optimizer, compile cache."""

    def __init__(self, name: str, args):
        setup = SETUPS[name]
        self.name, self.args = name, args
        self.dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        self.batch = args.batch or setup["batch"]
        self.shape = input_shape(name, args)
        self.augment = "none" if args.no_augment else setup["augment"]
        self.mean = jnp.asarray(setup["mean"], jnp.float32)
        self.std = jnp.asarray(setup["std"], jnp.float32)
        self.num_classes = 10 if name.endswith("cifar") else 1000
        self.schedule = cosine_schedule(0.1, CIFAR_RECIPE_STEPS)
        self.tx = make_optimizer(name="sgd", schedule=self.schedule, momentum=0.9,
                                 nesterov=setup["nesterov"], weight_decay=setup["weight_decay"])
        key = jax.random.PRNGKey(7)
        pixels = jax.random.randint(key, (self.batch, *self.shape), 0, 256, jnp.int32)
        self.images = pixels.astype(jnp.uint8)
        self.labels = jax.random.randint(jax.random.fold_in(key, 1), (self.batch,), 0,
                                         self.num_classes, jnp.int32)
        self.cache = StepCache()

    def record(self, kind: str, mode: str, **fields) -> dict:
        return {"kind": kind, "model": self.name, "mode": mode, "batch": self.batch,
                "image_size": self.shape[0], "width": self.args.width, "dtype": self.args.dtype,
                "augment": self.augment, "blocks_impl": self.args.blocks,
                **fields, "device": device_string(), "jax": jax.__version__}

    def train_state(self, variables, eligible, opt_state=None):
        """A fresh device copy (the step donates it; `variables` stay usable), built by one
        jitted program rather than an eager op per leaf."""

        def fresh(variables, opt_state):
            opt = self.tx.init(variables["params"]) if opt_state is None else opt_state
            state = new_train_state(variables, opt, num_scores=len(eligible))
            return jax.tree_util.tree_map(jnp.copy, state)

        return jax.jit(fresh)(variables, opt_state)

    def compile_train(self, model, state, eligible):
        """(compiled step, seconds to trace+lower+compile), as the trainer compiles it."""
        fn = make_train_step(model, self.tx, self.schedule, eligible=eligible, metric="synflow",
                             num_classes=self.num_classes, label_smoothing=0.0, mean=self.mean,
                             std=self.std, augment_kind=self.augment, dtype=self.dtype)
        before = self.cache.compile_seconds
        compiled = self.cache.get("train", fn, (state, self.images, self.labels, self.keys(1)[0]),
                                  donate=(0,))
        return compiled, self.cache.compile_seconds - before

    def keys(self, n: int) -> list:
        return list(jax.random.split(jax.random.PRNGKey(3), n))

    def time_train(self, model, variables, mode: str, grows: bool):
        """Train-step record and the final state (for the regrow measurement)."""
        eligible = eligible_slots(variables["params"]) if grows else []
        state = self.train_state(variables, eligible)
        step, compile_s = self.compile_train(model, state, eligible)
        keys = self.keys(self.args.warmup + self.args.steps)
        for rng in keys[: self.args.warmup]:
            state, _ = step(state, self.images, self.labels, rng)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for rng in keys[self.args.warmup:]:
            state, metrics = step(state, self.images, self.labels, rng)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - start
        rec = self.record("train", mode, **rates(self.batch, self.args.steps, seconds),
                          compile_s=round(compile_s, 2), peak_mem_gib=peak_mem_gib(),
                          **compiled_memory(step),
                          params_m=round(models.count_params(variables) / 1e6, 3),
                          blocks=len(structure_of(variables["params"])),
                          loss=float(metrics["loss"]))
        return rec, state

    def time_regrow(self, model, state):
        """Compile seconds after one more grow: train step, eval step, BN calibration."""
        params, stats = state["params"], state["batch_stats"]
        path = next_growable(params)
        if path is None:
            return None
        variables = {"params": params, "batch_stats": stats}
        geoms = top_geometries(model, variables, self.shape)
        params, stats = grow_at(jax.random.PRNGKey(5), params, stats, path, geoms[path],
                                allowed_branches(geoms[path]))
        variables = {"params": params, "batch_stats": stats}
        eligible = eligible_slots(params)
        opt_state, _ = remap_opt_state(self.tx, state["opt_state"], params)
        new_state = self.train_state(variables, eligible, opt_state)
        _, compile_s = self.compile_train(model, new_state, eligible)
        _, eval_compile_s = self.compile_eval(model, variables)
        prepare = jax.jit(make_prepare_images(self.mean, self.std, self.augment, self.dtype))
        batch = prepare(self.keys(1)[0], self.images)
        start = time.perf_counter()
        jax.block_until_ready(calibrate_block(model, variables, path, geoms, [batch]))
        calib_s = time.perf_counter() - start
        return self.record("regrow", "dyrep", slot=".".join(path), compile_s=round(compile_s, 2),
                           eval_compile_s=round(eval_compile_s, 2), calib_s=round(calib_s, 2))

    def compile_eval(self, model, variables):
        fn = make_eval_step(model, num_classes=self.num_classes, mean=self.mean, std=self.std,
                            dtype=self.dtype)
        mask = jnp.ones((self.batch,), jnp.bool_)
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(variables, self.images, self.labels, mask).compile()
        return compiled, time.perf_counter() - start

    def time_infer(self, model, variables, mode: str):
        variables = jax.device_put(variables)
        step, compile_s = self.compile_eval(model, variables)
        mask = jnp.ones((self.batch,), jnp.bool_)
        jax.block_until_ready(step(variables, self.images, self.labels, mask))
        for _ in range(self.args.warmup - 1):
            step(variables, self.images, self.labels, mask)
        start = time.perf_counter()
        for _ in range(self.args.steps):
            out = step(variables, self.images, self.labels, mask)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - start
        return self.record("infer", mode, **rates(self.batch, self.args.steps, seconds),
                           compile_s=round(compile_s, 2),
                           params_m=round(models.count_params(variables) / 1e6, 3))


def rates(batch: int, steps: int, seconds: float) -> dict:
    return {"img_per_s": round(batch * steps / seconds, 1),
            "step_ms": round(1000 * seconds / steps, 3)}


def peak_mem_gib():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**30, 3)


def compiled_memory(compiled) -> dict:
    """XLA's own buffer sizes for the program (any backend, CPUs included): temp_gib is
    what the step allocates beyond its arguments and outputs (activations kept for the
    backward pass, mostly)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not report it
        return {"xla_temp_gib": None}
    return {"xla_temp_gib": round(stats.temp_size_in_bytes / 2**30, 4)}


def device_string() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


def run_config(name: str, mode: str, args) -> list[dict]:
    """Every measurement of one (model, mode), in this process."""
    # benchmark switches: the reference path, or no sharing of the 1x1 convs
    with forward_options(share_1x1=args.blocks == "fast",
                         fuse_inference=args.blocks != "branchwise"):
        return measure_config(name, mode, args)


def measure_config(name: str, mode: str, args) -> list[dict]:
    bench = Bench(name, args)
    model, variables = build(name, mode, args)
    train, state = bench.time_train(model, variables, mode, grows=mode == "dyrep")
    out = [train]
    if args.no_extras:
        return out
    if mode == "dyrep":
        regrow = bench.time_regrow(model, state)
        out += [regrow] if regrow else []
    del state
    if mode in ("plain", "dbb"):
        out.append(bench.time_infer(model, variables, mode))
    if mode == "plain":
        deploy = models.create_model(name, width=args.width, dtype=bench.dtype, deploy=True)
        out.append(bench.time_infer(deploy, jax.jit(models.fuse_network)(variables), "fused"))
    return out


def run_isolated(name: str, mode: str, args) -> list[dict]:
    """`run_config` in a fresh process (clean peak memory, no shared compile state)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", f"{name}:{mode}",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
           "--batch", str(args.batch), "--width", str(args.width),
           "--image-size", str(args.image_size), "--blocks", args.blocks, "--no-isolate"]
    cmd += ["--no-extras"] if args.no_extras else []
    cmd += ["--no-augment"] if args.no_augment else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        records.append({"kind": "error", "model": name, "mode": mode,
                        "error": f"child exited with {proc.returncode}"})
    return records


def ratios(name: str, records: list[dict]) -> dict:
    """The issue's ratios from records of one run (None where a side is missing)."""
    def pick(kind, mode, field):
        for r in records:
            if r.get("kind") == kind and r.get("model") == name and r.get("mode") == mode:
                return r.get(field)
        return None

    def ratio(a, b):
        return None if a is None or not b else round(a / b, 3)

    plain = pick("train", "plain", "img_per_s")
    out = {
        "kind": "ratios", "model": name,
        "dbb/plain": ratio(pick("train", "dbb", "img_per_s"), plain),
        "dyrep/plain": ratio(pick("train", "dyrep", "img_per_s"), plain),
        "fused/plain_infer": ratio(pick("infer", "fused", "img_per_s"),
                                   pick("infer", "plain", "img_per_s")),
        "dbb_infer/plain_infer": ratio(pick("infer", "dbb", "img_per_s"),
                                       pick("infer", "plain", "img_per_s")),
        "dbb_mem/plain_mem": ratio(pick("train", "dbb", "peak_mem_gib"),
                                   pick("train", "plain", "peak_mem_gib")),
        "dbb_xla_temp/plain_xla_temp": ratio(pick("train", "dbb", "xla_temp_gib"),
                                             pick("train", "plain", "xla_temp_gib")),
        "regrow_compile_s": pick("regrow", "dyrep", "compile_s"),
    }
    if name == "vgg16_cifar":
        out["recipe_compile_frac_est"] = recipe_compile_fraction(pick)
    return out


def recipe_compile_fraction(pick):
    """Compile share of the CIFAR recipe's wall time, estimated from this run: the first
    train compile plus, per adjustment, the train and eval re-compiles and the calibration,
    against that plus every step at the dyrep step time (host input and eval left out)."""
    parts = [pick("train", "dyrep", "compile_s"), pick("train", "dyrep", "step_ms"),
             pick("regrow", "dyrep", "compile_s"), pick("regrow", "dyrep", "eval_compile_s"),
             pick("regrow", "dyrep", "calib_s")]
    if None in parts:
        return None
    first, step_ms, train_s, eval_s, calib_s = parts
    compile_total = first + CIFAR_RECIPE_ADJUSTS * (train_s + eval_s + calib_s)
    return round(compile_total / (CIFAR_RECIPE_STEPS * step_ms / 1000 + compile_total), 4)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.only:
        name, mode = args.only.split(":")
        records = run_config(name, mode, args)
        for rec in records:
            emit(rec)
        return records
    # `timeout` sends SIGTERM: exit through Python so subprocess.run kills the child too
    # (an orphan would keep holding the accelerator's memory)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    records = []
    for name in split(args.models):
        for mode in split(args.modes):
            runner = run_isolated if args.isolate else run_config
            for rec in runner(name, mode, args):
                records.append(rec)
                emit(rec)
        records.append(ratios(name, records))
        emit(records[-1])
    return records


if __name__ == "__main__":
    main()
