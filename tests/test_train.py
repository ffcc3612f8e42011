"""End to end on a tiny config: train, exact resume, SIGTERM, NaN, devices, export, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_helpers import tiny_config

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import evaluate, train
from dyrep_jax.train import TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_params(workdir, config):
    trainer = train.Trainer(config, workdir)
    state, meta = trainer.restore()
    return train.to_host(state["params"]), meta


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """2 epochs, DyRep adjusting after epoch 1, in one go (shared by several tests)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    result = train.run(tiny_config(), workdir)
    return workdir, result


def test_train_writes_metrics_structure_checkpoints_and_fused(straight_run):
    workdir, result = straight_run
    assert result["status"] == "done"
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    epochs = [r for r in lines if not r.get("final")]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        for key in ("train_loss", "train_top1", "test_loss", "test_top1", "lr", "params", "macs",
                    "img_per_s", "compile_s"):
            assert key in r
        assert 0.0 <= r["test_top1"] <= 1.0
    final = lines[-1]
    assert final["final"] and abs(final["fused_test_top1"] - final["test_top1"]) <= 0.001
    decisions = [json.loads(x) for x in open(os.path.join(workdir, "structure.jsonl"))]
    assert decisions and decisions[0]["op"] == "grow" and decisions[0]["epoch"] == 1
    for key in ("epoch", "step", "op", "slot", "branches", "params", "macs"):
        assert key in decisions[0]
    assert decisions[-1]["params"] == epochs[0]["params"]  # epoch lines report the structure after adjusting
    assert os.path.exists(os.path.join(workdir, "structure.png"))
    assert os.path.exists(os.path.join(workdir, "fused", "arch.json"))
    assert os.listdir(os.path.join(workdir, "tb"))
    # the fused network has no BN and as many params as the plain network (+ conv biases)
    fused, arch = ckpt.load_fused(os.path.join(workdir, "fused"))
    assert "batch_stats" not in fused and arch["model"] == "resnet18_cifar"


def test_crash_and_resume_gives_identical_parameters(straight_run, tmp_path):
    straight_dir, _ = straight_run
    workdir = str(tmp_path)
    spe = 64 // 16
    with pytest.raises(TrainingError, match=r"loss became nan.*last good checkpoint"):
        train.run(tiny_config(debug_fail_at_step=spe + 1), workdir)  # dies in epoch 2
    mngr = ckpt.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
    assert mngr.all_steps() == [spe]  # the epoch-1 checkpoint, nothing after the NaN
    result = train.run(tiny_config(), workdir)  # same command again: resumes
    assert result["status"] == "done"
    a, _ = final_params(straight_dir, tiny_config())
    b, meta = final_params(workdir, tiny_config())
    assert meta["epoch"] == 2
    assert_trees_equal(a, b)
    same = [json.loads(x)["slot"] for x in open(os.path.join(workdir, "structure.jsonl"))]
    ref = [json.loads(x)["slot"] for x in open(os.path.join(straight_dir, "structure.jsonl"))]
    assert same == ref


def test_sigterm_saves_mid_epoch_and_resume_is_exact(straight_run, tmp_path):
    straight_dir, _ = straight_run
    workdir = str(tmp_path)
    script = (
        "import sys; sys.path.insert(0, {!r}); sys.path.insert(0, {!r})\n"
        "import logging; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from train_helpers import tiny_config\n"
        "from dyrep_jax import train\n"
        "r = train.run(tiny_config(), {!r})\n"
        "print('RESULT', r['status'], r.get('epoch'), flush=True)\n"
    ).format(ROOT, os.path.join(ROOT, "tests"), workdir)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    out = []
    deadline = time.time() + 240
    for line in proc.stdout:
        out.append(line)
        if "epoch 2 step 1/" in line:
            proc.send_signal(signal.SIGTERM)
        if time.time() > deadline:
            proc.kill()
            break
    proc.wait(timeout=60)
    text = "".join(out)
    assert proc.returncode == 0, text[-3000:]
    assert "RESULT preempted 2" in text, text[-3000:]  # the epoch number the log uses
    trainer = train.Trainer(tiny_config(), workdir)
    _, meta = trainer.restore()
    assert meta["epoch"] == 1 and 0 < meta["step_in_epoch"] < 4
    assert train.run(tiny_config(), workdir)["status"] == "done"
    a, _ = final_params(straight_dir, tiny_config())
    b, _ = final_params(workdir, tiny_config())
    assert_trees_equal(a, b)
    assert_same_train_figures(straight_dir, workdir)  # the resumed epoch counts all its steps


def assert_same_train_figures(dir_a, dir_b):
    def figures(d):
        return [(r["epoch"], r["train_loss"], r["train_top1"])
                for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "epoch" in r]

    assert figures(dir_a) == figures(dir_b)


def test_corrupt_latest_checkpoint_falls_back_with_warning(straight_run, tmp_path, caplog):
    import shutil

    straight_dir, _ = straight_run
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_dir, workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckdir) if s.isdigit())
    latest = os.path.join(ckdir, str(steps[-1]), "state")
    for root, _, files in os.walk(latest):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    trainer = train.Trainer(tiny_config(), workdir)
    with caplog.at_level("WARNING", logger="dyrep_jax"):
        _, meta = trainer.restore()
    assert meta["epoch"] == 1
    assert "could not be restored" in caplog.text


def test_eight_devices_match_one_device(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    # plain mode plus BN recalibration after the epoch: statistics must be global-batch ones
    cfg = dict(num_epochs=1, **{"dyrep.mode": "plain", "dyrep.recal_bn_every_epoch": True})
    one = train.run(tiny_config(num_devices=1, **cfg), str(tmp_path / "one"))
    eight = train.run(tiny_config(num_devices=8, **cfg), str(tmp_path / "eight"))
    m1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")][0]
    m8 = [json.loads(x) for x in open(tmp_path / "eight" / "metrics.jsonl")][0]
    assert abs(m1["train_loss"] - m8["train_loss"]) < 1e-4
    assert abs(one["test_top1"] - eight["test_top1"]) < 1e-6
    p1, _ = final_params(str(tmp_path / "one"), tiny_config(num_devices=1, **cfg))
    p8, _ = final_params(str(tmp_path / "eight"), tiny_config(num_devices=8, **cfg))
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
    s1 = train.Trainer(tiny_config(num_devices=1, **cfg), str(tmp_path / "one")).restore()[0]
    s8 = train.Trainer(tiny_config(num_devices=8, **cfg), str(tmp_path / "eight")).restore()[0]
    for a, b in zip(jax.tree_util.tree_leaves(train.to_host(s1["batch_stats"])),
                    jax.tree_util.tree_leaves(train.to_host(s8["batch_stats"])), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)


def test_eval_and_export_modes(straight_run, tmp_path):
    import shutil

    straight_dir, result = straight_run
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "fused"))
    out = evaluate.evaluate_latest(tiny_config(), workdir)
    assert out["test_top1"] == pytest.approx(result["test_top1"])
    assert abs(out["fused_test_top1"] - out["test_top1"]) <= 0.001
    exported = evaluate.export_latest(tiny_config(), workdir)
    fused, arch = ckpt.load_fused(exported["fused_dir"])
    assert arch["params"] == exported["params"] == result["fused_params"]
    assert arch["test_top1"] == exported["fused_test_top1"]  # export keeps test_top1


def test_eval_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.evaluate_latest(tiny_config(), str(tmp_path))


def test_unknown_config_field_fails_before_any_work(tmp_path):
    cfg = tiny_config()
    cfg.unlock()
    cfg.optim.learning_rate = 0.1
    with pytest.raises(ValueError, match=r"unknown config field 'optim\.learning_rate'"):
        train.run(cfg, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")
    with pytest.raises(ValueError, match="unknown mode 'dyrep2'"):
        train.run(tiny_config(**{"dyrep.mode": "dyrep2"}), str(tmp_path / "w"))


def test_cli_rejects_unknown_override(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dyrep_jax.main", "--config", "configs/quickstart.py",
         "--workdir", str(tmp_path), "--config.optim.learningrate=0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown config field 'optim.learningrate'" in proc.stderr + proc.stdout


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="npz"):
        train.run(tiny_config(**{"data.dataset": f"npz:{tmp_path}/nope.npz"}), str(tmp_path))


def test_broken_latest_checkpoint_is_moved_aside_and_reruns_finish(straight_run, tmp_path):
    import shutil

    straight_dir, _ = straight_run
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_dir, workdir)
    ckdir = os.path.join(workdir, "checkpoints")
    latest = max(int(s) for s in os.listdir(ckdir) if s.isdigit())
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckdir, str(latest), "state"))
             for f in fs]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:  # truncate one file of the latest checkpoint
        f.truncate(os.path.getsize(victim) // 2)
    first = train.run(tiny_config(), workdir)  # falls back to epoch 1, retrains epoch 2
    assert first["status"] == "done"
    assert os.path.exists(os.path.join(ckdir, "broken", str(latest), "state"))  # kept aside
    second = train.run(tiny_config(), workdir)  # resumes from the retrained step: nothing to do
    assert second["status"] == "done"
    assert second["test_top1"] == pytest.approx(first["test_top1"])
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r.get("epoch") for r in lines if not r.get("final")] == [1, 2]
    assert_same_train_figures(straight_dir, workdir)
