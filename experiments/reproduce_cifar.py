"""The paper's CIFAR-10 ablation at reduced scale: plain vs DBB vs Rep vs DyRep (Rep + Dep).

Runs the four modes through the normal entry point (`python -m dyrep_jax.main`) with the
same seeds and a schedule scaled to fit, then writes a markdown report with, per mode:
test top-1 (mean and spread over seeds), fused test top-1, wall time, images/s, total
compile seconds, training-time params and MACs at the end, and the structure evolution.

  # CPU (anyone can repeat it; at most about 15 minutes on 2 cores):
  python experiments/reproduce_cifar.py --profile cpu --npz DIR/cifar10_16k.npz
  # GPU (VGG-16, the reference recipe scaled to 30 epochs, adjust every 2 until 25, bf16):
  python experiments/reproduce_cifar.py --profile gpu --npz DIR/cifar10_16k.npz

Real CIFAR-10 as npz (uint8 x_train, y_train, x_test, y_test) is not in the repository;
pass its path.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("plain", "dbb", "rep", "dyrep")

PROFILES = {
    # a small ResNet-18-for-CIFAR on a few thousand real images: minutes per mode on a CPU
    "cpu": {
        "config": "configs/cifar10_resnet18.py",
        "overrides": {
            "model.width": 0.125, "model.dtype": "float32", "data.max_train_examples": 4096,
            "data.max_test_examples": 1000, "batch_size": 128, "eval_batch_size": 500,
            "num_epochs": 10, "dyrep.adjust_interval": 2, "dyrep.max_adjust_epochs": 8,
            "dyrep.calib_batches": 4, "optim.lr": 0.1, "optim.min_lr": 0.0,
            "log_every_steps": 32,
        },
        "what": "ResNet-18 (CIFAR stem) at width 0.125, first 4096 train / 1000 test images, "
                "10 epochs, adjust every 2 epochs until epoch 8, float32, batch 128",
    },
    # the reference CIFAR recipe with epochs / adjust interval / last adjust scaled together
    "gpu": {
        "config": "configs/cifar10_vgg16.py",
        "overrides": {
            "model.dtype": "bfloat16", "num_epochs": 30, "dyrep.adjust_interval": 2,
            "dyrep.max_adjust_epochs": 25, "batch_size": 128, "eval_batch_size": 500,
            "log_every_steps": 100,
        },
        "what": "VGG-16 (CIFAR), reference recipe scaled to 30 epochs, adjust every 2 until "
                "epoch 25, bfloat16, batch 128",
    },
}


def run_one(profile: dict, mode: str, seed: int, npz: str, workdir: str, extra: list[str]):
    cmd = [sys.executable, "-m", "dyrep_jax.main", "--config", profile["config"],
           "--workdir", workdir, f"--config.data.dataset=npz:{npz}",
           f"--config.dyrep.mode={mode}", f"--config.seed={seed}"]
    cmd += [f"--config.{k}={v}" for k, v in profile["overrides"].items()] + extra
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    with open(os.path.join(workdir, "stdout.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"run {mode} seed {seed} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(workdir: str) -> dict:
    metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    epochs = [m for m in metrics if not m.get("final")]
    final = [m for m in metrics if m.get("final")][-1]
    decisions = read_jsonl(os.path.join(workdir, "structure.jsonl"))
    rates = [m["img_per_s"] for m in epochs[1:]] or [epochs[-1]["img_per_s"]]
    return {
        "test_top1": final["test_top1"], "fused_test_top1": final["fused_test_top1"],
        "wall_s": final["wall_s"], "img_per_s": statistics.median(rates),
        "compile_s": final["compile_s_total"], "params": epochs[-1]["params"],
        "macs": epochs[-1]["macs"], "fused_params": final["fused_params"],
        "fused_macs": final["fused_macs"],
        "grows": [d["slot"] for d in decisions if d["op"] == "grow"],
        "cuts": [(d["slot"], d["branches"]) for d in decisions if d["op"] == "cut"],
        "structure": final.get("structure", {}),
    }


def fmt_pct(values):
    mean = statistics.mean(values) * 100
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * 100:.2f}"


def report(profile_name: str, profile: dict, results: dict, npz: str, seeds, args) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()
    lines = [
        f"## {profile_name.upper()} run: {profile['what']}",
        "",
        f"- command: `python experiments/reproduce_cifar.py --profile {profile_name} --npz "
        f"{os.path.basename(npz)} --seeds {' '.join(map(str, seeds))}` (commit {commit})",
        f"- data: `{os.path.basename(npz)}` (real CIFAR-10 from the project's get_cifar10 "
        "script); test top-1 on the first test images as configured",
        f"- machine: {args.machine}",
        "",
        "| mode | test top-1 % | fused top-1 % | wall s | img/s | compile s | train params "
        "| train MACs | deploy params | deploy MACs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        rs = results.get(mode)
        if not rs:
            continue
        lines.append(
            f"| {mode} | {fmt_pct([r['test_top1'] for r in rs])} | "
            f"{fmt_pct([r['fused_test_top1'] for r in rs])} | "
            f"{statistics.mean(r['wall_s'] for r in rs):.0f} | "
            f"{statistics.mean(r['img_per_s'] for r in rs):.0f} | "
            f"{statistics.mean(r['compile_s'] for r in rs):.1f} | "
            f"{rs[0]['params'] / 1e6:.3f}M | {rs[0]['macs'] / 1e6:.1f}M | "
            f"{rs[0]['fused_params'] / 1e6:.3f}M | {rs[0]['fused_macs'] / 1e6:.1f}M |")
    lines += ["", f"Structure at the end (seed {seeds[0]}):", ""]
    for mode in ("rep", "dyrep"):
        rs = results.get(mode)
        if not rs:
            continue
        r = rs[0]
        grown = collections.Counter(s.split(".")[0] for s in r["grows"])
        lines.append(f"- {mode}: {len(r['grows'])} grows ({', '.join(r['grows'])}); "
                     f"{len(r['cuts'])} cuts "
                     f"({'; '.join(f'{s}: {b}' for s, b in r['cuts']) or 'none'}); "
                     f"grows per top-level unit: {dict(grown)}")
    lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--npz", required=True, help="real CIFAR-10 as npz (uint8 NHWC)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--workroot", default="runs/reproduce_cifar")
    parser.add_argument("--out", default="experiments/results/cifar10_reduced_{profile}.md")
    parser.add_argument("--machine", default="(not stated)", help="recorded in the report")
    parser.add_argument("--extra", nargs="*", default=[], help="extra --config.x=y overrides")
    args = parser.parse_args()
    npz = os.path.abspath(args.npz)
    if not os.path.exists(npz):
        sys.exit(f"{npz} not found: write it with the CIFAR-10 download script (see README)")
    profile = PROFILES[args.profile]
    results = collections.defaultdict(list)
    out_dir = os.path.join(ROOT, os.path.dirname(args.out))
    for seed in args.seeds:
        for mode in args.modes:
            workdir = os.path.join(ROOT, args.workroot, args.profile, f"{mode}_s{seed}")
            if os.path.exists(workdir):
                shutil.rmtree(workdir)
            os.makedirs(workdir)
            run_one(profile, mode, seed, npz, workdir, args.extra)
            summary = summarize(workdir)
            results[mode].append(summary)
            print(json.dumps({"mode": mode, "seed": seed,
                              **{k: v for k, v in summary.items() if k != "structure"}}),
                  flush=True)
            png = os.path.join(workdir, "structure.png")
            if os.path.exists(png) and mode in ("rep", "dyrep") and seed == args.seeds[0]:
                shutil.copy(png, os.path.join(out_dir,
                                              f"cifar10_reduced_{args.profile}_{mode}.png"))
    text = report(args.profile, profile, results, npz, args.seeds, args)
    out = os.path.join(ROOT, args.out.format(profile=args.profile))
    with open(out, "w") as f:
        f.write(f"# CIFAR-10 ablation at reduced scale ({args.profile})\n\n"
                "Generated by `experiments/reproduce_cifar.py`; the reading below the table "
                "is written by hand.\n\n" + text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
