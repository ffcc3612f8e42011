"""The training benchmark runs and reports its fields; its fast block paths stay exact.

`apply_block` (shared 1x1 conv + BN in training, fused conv at inference) must equal
the branchwise definition `apply_block_branchwise`, outputs and running statistics,
for every branch kind, groups, stride, padding and nesting (tolerance as in test_rep).
Since inference runs the fused conv, these are also the checks that fusion is exact.
No timing is asserted: the smoke run only has to work and print well-formed lines.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from rep_helpers import max_abs, randomize_bn_params, randomize_stats

from dyrep_jax.rep import ConvGeometry, allowed_branches, apply_slot, fast, grow_slot
from dyrep_jax.rep.apply import apply_slot_branchwise
from dyrep_jax.rep.fast import concat_channels, split_channels
from dyrep_jax.rep.network import grow_at

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FIELDS = {"kind", "model", "mode", "batch", "img_per_s", "step_ms", "compile_s",
                "peak_mem_gib", "params_m", "device", "jax"}


def random_block(geom, branches, seed):
    key = jax.random.PRNGKey(seed)
    k = geom.kernel_size
    kernel = jax.random.normal(key, (k, k, geom.in_channels // geom.groups, geom.out_channels))
    params, stats = grow_slot(key, {"kernel": kernel * 0.3}, geom, branches)
    params = randomize_bn_params(jax.random.fold_in(key, 1), params)
    return params, randomize_stats(jax.random.fold_in(key, 2), stats)


def nested_block(geom, seed=0):
    """A block whose kxk conv and 1x1_kxk conv2 are blocks too."""
    key = jax.random.PRNGKey(seed)
    params, stats = random_block(geom, allowed_branches(geom), seed)
    params, stats = {"s": params}, {"s": stats}
    params, stats = grow_at(key, params, stats, ("s", "kxk", "conv"), geom, ["1x1", "1x1_avg"])
    conv2 = geom._replace(padding=0)
    params, stats = grow_at(key, params, stats, ("s", "1x1_kxk", "conv2"), conv2,
                            ["1x1_kxk", "1x1_avg"])
    return params["s"], randomize_stats(jax.random.fold_in(key, 3), stats)["s"]


def assert_same_as_branchwise(params, stats, geom, seed=3, dtype=jnp.float32):
    x = jax.random.normal(jax.random.PRNGKey(seed), (3, 9, 9, geom.in_channels)).astype(dtype)
    for train in (True, False):
        y, st = apply_slot(params, stats, x, geom, train)
        y_ref, st_ref = apply_slot_branchwise(params, stats, x, geom, train)
        assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
        scale = 1.0 + float(jnp.max(jnp.abs(y_ref.astype(jnp.float32))))
        bound = (1e-4 if dtype == jnp.float32 else 3e-2) * scale
        assert max_abs(y, y_ref) <= bound, (train, max_abs(y, y_ref))
        assert jax.tree_util.tree_structure(st) == jax.tree_util.tree_structure(stats)
        for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(st_ref),
                        strict=True):
            assert a.dtype == jnp.float32
            assert max_abs(a, b) <= 1e-4 * (1.0 + float(jnp.max(jnp.abs(b)))), train


@pytest.mark.parametrize("groups,stride,k", list(itertools.product((1, 2, "dw"), (1, 2), (3, 5))))
@pytest.mark.parametrize("share", [True, False])
def test_fast_block_equals_branchwise_all_branches(groups, stride, k, share, monkeypatch):
    monkeypatch.setattr(fast, "SHARE_1X1", share)
    g = 4 if groups == "dw" else groups
    geom = ConvGeometry(4, 4, k, stride, None, g)
    params, stats = random_block(geom, allowed_branches(geom), seed=k + stride)
    assert_same_as_branchwise(params, stats, geom)


@pytest.mark.parametrize("branches", [("1x1",), ("1x1_kxk",), ("1x1_avg",), ("1x1", "1x1_kxk"),
                                      ("1x1", "1x1_avg"), ("1x1_kxk", "1x1_avg"), ("id",)])
def test_fast_block_equals_branchwise_subsets(branches):
    geom = ConvGeometry(4, 8, 3, 1, None, 2) if "id" not in branches else \
        ConvGeometry(6, 6, 3, 1, None, 3)
    params, stats = random_block(geom, branches, seed=11)
    assert_same_as_branchwise(params, stats, geom)


@pytest.mark.parametrize("geom", [ConvGeometry(4, 4, 3, 1, 0, 2), ConvGeometry(4, 8, 3, 2, None, 4),
                                  ConvGeometry(3, 9, 5, 1, None, 1)])
def test_fast_block_equals_branchwise_padding_and_channel_changes(geom):
    params, stats = random_block(geom, allowed_branches(geom), seed=5)
    assert_same_as_branchwise(params, stats, geom)


@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2)])
def test_fast_block_equals_branchwise_nested(groups, stride):
    geom = ConvGeometry(4, 4, 3, stride, None, groups)
    params, stats = nested_block(geom)
    assert_same_as_branchwise(params, stats, geom)


def test_fast_block_bfloat16_close_to_branchwise():
    geom = ConvGeometry(8, 8, 3, 1, None, 1)
    params, stats = random_block(geom, allowed_branches(geom), seed=4)
    assert_same_as_branchwise(params, stats, geom, dtype=jnp.bfloat16)


def test_grouped_concat_round_trips():
    a = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6)
    b = -jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4)
    for groups in (1, 2):
        joined = concat_channels([a, b], groups)
        assert joined.shape == (2, 10)
        back = split_channels(joined, [6, 4], groups)
        assert max_abs(back[0], a) == 0.0 and max_abs(back[1], b) == 0.0
    # group-major: group 0 holds a's first 3 and b's first 2 channels
    assert concat_channels([a, b], 2)[0].tolist() == [0, 1, 2, 0, -1, 3, 4, 5, -2, -3]


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

