"""The training benchmark runs and reports its fields.

No timing is asserted: the smoke run only has to work and print well-formed lines. (The
fast block paths it measures are checked against the branchwise reference in test_rep.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FIELDS = {"kind", "model", "mode", "batch", "img_per_s", "step_ms", "compile_s",
                "peak_mem_gib", "params_m", "device", "jax"}


def run_bench(*flags, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"), *flags],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_bench_tiny_prints_every_measurement():
    records = run_bench("--tiny")
    kinds = {(r["kind"], r.get("mode")) for r in records}
    assert {("train", m) for m in ("plain", "dyrep", "dbb")} <= kinds
    assert {("infer", "plain"), ("infer", "dbb"), ("infer", "fused"), ("regrow", "dyrep")} <= kinds
    for r in records:
        if r["kind"] == "train":
            assert TRAIN_FIELDS <= set(r), r
            assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
            assert r["batch"] == 4 and r["model"] == "vgg16_cifar"
    train = {r["mode"]: r for r in records if r["kind"] == "train"}
    assert train["plain"]["blocks"] == 0 < train["dyrep"]["blocks"] < train["dbb"]["blocks"]
    (ratios,) = [r for r in records if r["kind"] == "ratios"]
    for key in ("dbb/plain", "dyrep/plain", "fused/plain_infer", "regrow_compile_s",
                "recipe_compile_frac_est"):
        assert ratios[key] is not None and ratios[key] > 0, key


def test_bench_isolated_resnet_child_process():
    records = run_bench("--tiny", "--isolate", "--models", "resnet18", "--modes", "plain",
                        "--no-extras")
    assert [r["kind"] for r in records] == ["train", "ratios"]
    assert TRAIN_FIELDS <= set(records[0]) and records[0]["model"] == "resnet18"

