"""Everything `experiments/results/perf-h200.md` owes, as one pre-tested call per part.

Each part runs its items one after another as subprocesses of the project's own scripts,
through their command lines only, with a timeout per item that keeps the part inside its
budget (530 s of items, so a part ends by 560 s; the call gets timeout_s=600). Every JSON
line an item prints goes to $OUT/part<N>.jsonl, tagged with the item's name, followed by
one `item` status line (exit code, seconds, timed out or not); stderr and other output go
to $OUT/part<N>.log. `render_device_results.py` turns those lines into the results pages.

  part 1: VGG-16 CIFAR plain/dyrep/dbb + regrow + inference (bench_train.py), the bare
          Flax anchors of both models (.bench/flax_anchor.py, carried), the host input
          (bench_input.py) and the block A/B (dbb with unshared and branchwise blocks)
  part 2: ResNet-18 at 224 px, plain/dyrep/dbb + regrow + inference
  part 3: the CIFAR-10 ablation, reproduce_cifar.py --profile gpu, one run per mode

  python experiments/device_check.py --part 1          # on the device (perf-h200.md)
  python experiments/device_check.py --tiny            # every part, small, on a CPU

The driver never imports jax, so it holds no accelerator memory of its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 530  # per part, items only; with start-up and kill grace a part ends by 560 s
KILL_GRACE_S = 8  # after SIGTERM, before SIGKILL
ANCHOR = ".bench/flax_anchor.py"  # carried copy of the bare-Flax anchor script (perf-h200.md)
NPZ = "data_local/cifar10_16k.npz"  # carried subset of real CIFAR-10 (first 16k/4k)
PARTS = ("1", "2", "3")
# mode -> nominal seconds; rep runs last, as the least informative if time runs out
CIFAR_MODES = {"plain": 90, "dbb": 130, "dyrep": 170, "rep": 140}
ITEM_NAMES = ("vgg", "anchor", "input", "ab_unshared", "ab_branchwise", "resnet18",
              *(f"cifar_{m}" for m in CIFAR_MODES))
# Small settings for --tiny: the CIFAR runs' config overrides (as --extra) and the anchor.
TINY_CIFAR = ("model.width=0.0625", "model.dtype=float32", "num_epochs=2",
              "dyrep.adjust_interval=1", "dyrep.max_adjust_epochs=1",
              "data.max_train_examples=64", "data.max_test_examples=32", "batch_size=16",
              "eval_batch_size=32", "dyrep.calib_batches=1", "log_every_steps=2",
              "num_devices=1")
TINY_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")


@dataclass(frozen=True)
class Item:
    """One measurement script run: its name (the tag on its lines), argv, nominal seconds."""

    name: str
    argv: tuple[str, ...]
    timeout_s: int


def bench(*flags: str) -> tuple[str, ...]:
    return ("experiments/bench_train.py", *flags)


def part_items(part: str, args) -> list[Item]:
    """The items of one part, with nominal seconds (shares of the part's budget)."""
    t = ("--tiny",) if args.tiny else ()
    if part == "1":
        anchor = ("vgg16_cifar:plain:f32:2" if args.tiny
                  else "vgg16_cifar:plain:bf16:128,resnet18:plain:bf16:256")
        steps = ("--steps", "2", "--warmup", "1") if args.tiny else ("--steps", "40",
                                                                     "--warmup", "10")
        return [
            Item("vgg", bench(*t, "--models", "vgg16_cifar"), 230),
            Item("anchor", (args.anchor, "--configs", anchor, *steps), 130),
            Item("input", ("experiments/bench_input.py", *t, "--batch", "128",
                           "--steps", "400"), 30),
            *[Item(f"ab_{b}", bench(*t, "--models", "vgg16_cifar", "--modes", "dbb",
                                    "--blocks", b, "--no-extras"), 70)
              for b in ("unshared", "branchwise")],
        ]
    if part == "2":
        modes = ("--modes", "plain") if args.tiny else ()  # tiny: ResNet-18 plain + extras only
        return [Item("resnet18", bench(*t, "--models", "resnet18", *modes), 530)]
    return [Item(f"cifar_{m}", cifar_argv(m, args), s) for m, s in CIFAR_MODES.items()]


def cifar_argv(mode: str, args) -> tuple[str, ...]:
    """One mode of the ablation; its report and structure plots land in OUT."""
    argv = ("experiments/reproduce_cifar.py", "--profile", "gpu", "--npz", args.npz,
            "--modes", mode, "--workroot", str(Path(args.scratch) / "cifar"),
            "--out", str(Path(args.out) / "reproduce_gpu.md"),
            "--machine", "device_check part 3")
    if not args.tiny:
        return argv
    # reproduce_cifar's --extra takes one value that may start with "--" (as --extra=V):
    # the tiny overrides go through absl's --flagfile
    flagfile = Path(args.scratch) / "tiny_cifar.flags"
    flagfile.write_text("".join(f"--config.{o}\n" for o in TINY_CIFAR))
    return (*argv, f"--extra=--flagfile={flagfile}")


def child_env(tiny: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if tiny:  # a CPU smoke run: one CPU device, cheap compiles (as bench_train --tiny)
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=TINY_XLA_FLAGS)
    return env


RUNNING: list[subprocess.Popen] = []  # the item in flight, for the SIGTERM handler


def run_item(item: Item, timeout_s: float, env: dict, scratch: Path):
    """(rc, timed_out, wall seconds, stdout text, stderr text) of one item.

    The item runs in its own process group (not its own session: the device ends a
    command's leftover processes only within its session), so a timeout ends it and its
    children.
    """
    out_path, err_path = scratch / f"{item.name}.out", scratch / f"{item.name}.err"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, *item.argv], cwd=ROOT, env=env, stdout=out,
                                stderr=err, preexec_fn=os.setpgrp)
        RUNNING.append(proc)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            timed_out, rc = True, stop_group(proc)
        finally:
            RUNNING.remove(proc)
    wall = time.perf_counter() - start
    return rc, timed_out, wall, out_path.read_text(), err_path.read_text()


def stop_group(proc: subprocess.Popen) -> int:
    """SIGTERM to the item's process group, SIGKILL after a grace period; its exit code."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def on_sigterm(*_):
    """If the call itself is stopped, take the item in flight down with it (no orphan
    keeps the accelerator's memory)."""
    for proc in list(RUNNING):
        stop_group(proc)
    sys.exit(143)


def split_output(item: Item, part: str, stdout: str) -> tuple[list[dict], list[str]]:
    """(JSON records tagged with item and part, the other stdout lines)."""
    records, other = [], []
    for line in stdout.splitlines():
        try:
            rec = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append({"item": item.name, "part": part, **rec})
        elif line.strip():
            other.append(line)
    return records, other


def status_record(item: Item, part: str, result, timeout_s: float, other: list[str]) -> dict:
    rc, timed_out, wall, _, stderr = result
    commands = [line[2:] for line in other if line.startswith("$ ")]  # reproduce_cifar's
    tail = [line for line in stderr.splitlines() if line.strip()][-1:] if rc != 0 else []
    return {"kind": "item", "item": item.name, "part": part,
            "cmd": " ".join(["python3", *item.argv]), "inner_cmd": commands, "rc": rc,
            "timed_out": timed_out, "timeout_s": round(timeout_s), "wall_s": round(wall, 1),
            "error": tail[0][-300:] if tail else None}


def env_record(part: str, args) -> dict:
    """What ran where: the GPU as nvidia-smi names it (None on a CPU), the commit, the mode."""
    def first_line(cmd):
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = proc.stdout.strip() if proc.returncode == 0 else ""
        return text.splitlines()[0] if text else None

    return {"kind": "env", "part": part, "tiny": args.tiny,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "gpu": first_line(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"]),
            "commit": first_line(["git", "rev-parse", "--short", "HEAD"]),
            "python": sys.version.split()[0]}


def run_part(part: str, args, out: Path, scratch: Path) -> list[dict]:
    """Run one part's items in order. The budget is shared in proportion to the items'
    nominal seconds, and each item may also use what earlier items left unused."""
    items = [i for i in part_items(part, args) if not args.only or i.name in args.only]
    if not items:
        return []
    jsonl, log = out / f"part{part}.jsonl", out / f"part{part}.log"
    records = [env_record(part, args)]
    append_lines(jsonl, records)
    deadline = time.monotonic() + args.budget
    scale = args.budget / sum(i.timeout_s for i in items)
    for n, item in enumerate(items):
        later = scale * sum(i.timeout_s for i in items[n + 1:])
        timeout_s = deadline - time.monotonic() - later
        missing = missing_input(item, args)
        if missing:  # recorded as an item that could not start (rc None)
            result, new, other = (None, False, 0.0, "", missing), [], []
        else:
            result = run_item(item, timeout_s, child_env(args.tiny), scratch)
            new, other = split_output(item, part, result[3])
        new.append(status_record(item, part, result, timeout_s, other))
        append_lines(jsonl, new)
        append_log(log, item, result, other)
        records += new
        print(json.dumps(new[-1]), flush=True)
    return records


def missing_input(item: Item, args) -> str | None:
    """A one-line error when a carried file an item reads is absent, else None."""
    if item.name == "anchor" and not (ROOT / args.anchor).exists():
        return (f"{args.anchor} not found: copy the bare-Flax anchor script there and "
                "carry its folder (setup in perf-h200.md)")
    if item.name.startswith("cifar_") and not (ROOT / args.npz).exists():
        return (f"{args.npz} not found: copy the 16k CIFAR-10 subset there and carry it "
                "(perf-h200.md)")
    if item.name.startswith("cifar_") and importlib.util.find_spec("ml_collections") is None:
        return ("ml_collections is not importable (python -m dyrep_jax.main needs it): "
                "install the carried .whl first, as call 3 of perf-h200.md does")
    return None


def append_lines(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def append_log(path: Path, item: Item, result, other: list[str]) -> None:
    """Non-JSON stdout and the last 200 stderr lines of an item, under a header."""
    rc, timed_out, wall, _, stderr = result
    with open(path, "a") as f:
        f.write(f"==== {item.name}: rc={rc} timed_out={timed_out} wall_s={wall:.1f}\n")
        f.writelines(line + "\n" for line in other + stderr.splitlines()[-200:])


def write_tiny_npz(path: Path) -> None:
    """Random CIFAR-shaped uint8 data for --tiny (the ablation's plumbing, not its result)."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
             y_train=rng.integers(0, 10, 64).astype(np.uint8),
             x_test=rng.integers(0, 256, (32, 32, 32, 3), np.uint8),
             y_test=rng.integers(0, 10, 32).astype(np.uint8))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default=None,
                        help="which part to run (default: all with --tiny; required otherwise)")
    parser.add_argument("--tiny", action="store_true",
                        help="every item at smoke size on a CPU (the scripts' own --tiny)")
    parser.add_argument("--only", default="", help="comma list of item names to (re)run")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds per part")
    parser.add_argument("--anchor", default=ANCHOR, help="bare-Flax anchor script (carried)")
    parser.add_argument("--npz", default=None,
                        help=f"CIFAR-10 npz for part 3 (default {NPZ}; --tiny: random data)")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="output folder (default $OUT, else a new temporary folder)")
    args = parser.parse_args(argv)
    if args.part is None and not args.tiny:
        parser.error("--part 1|2|3 is required on the device (see perf-h200.md); "
                     "--tiny runs every part")
    args.part = args.part or "all"
    args.only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(args.only) - set(ITEM_NAMES))
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)} (valid: {', '.join(ITEM_NAMES)})")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    scratch = Path(tempfile.mkdtemp(prefix="device_check_"))
    args.scratch = str(scratch)
    out = Path(args.out or tempfile.mkdtemp(prefix="device_check_out_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)  # absolute: reproduce_cifar resolves relative paths from the root
    if args.npz is None:
        args.npz = str(scratch / "tiny_cifar.npz") if args.tiny else NPZ
        if args.tiny:
            write_tiny_npz(Path(args.npz))
    try:
        for part in PARTS if args.part == "all" else (args.part,):
            run_part(part, args, out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # item outputs, CIFAR workdirs, tiny data
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
