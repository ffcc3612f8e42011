"""End to end on a tiny config: train, exact resume, SIGTERM, NaN, devices, export, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import branchwise_logits, tiny_config

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
    assert arch["with_bn_after_3x3"] is True and arch["num_classes"] == 4


def test_fused_export_equals_the_branchwise_training_network(straight_run):
    from dyrep_jax import models

    workdir, _ = straight_run
    fused, arch = ckpt.load_fused(os.path.join(workdir, "fused"))
    state, _ = train.Trainer(tiny_config(), workdir).restore()
    variables = train.to_host({"params": state["params"], "batch_stats": state["batch_stats"]})
    model = models.create_model("resnet18_cifar", num_classes=4, width=0.125)
    deploy = models.create_model("resnet18_cifar", num_classes=4, width=0.125, deploy=True)
    images = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    reference = branchwise_logits(model, variables, images)
    got = deploy.apply(fused, images)
    np.testing.assert_allclose(got, reference, atol=1e-4 * (1 + float(np.abs(reference).max())))


def test_epoch_figure_is_the_post_adjust_evaluation(tmp_path, monkeypatch):
    from dyrep_jax.experiment import Experiment
    from dyrep_jax.rep.tree import structure_of

    def grown_slots(self, model, variables, name):  # an "evaluation" that shows the structure
        grown = len(structure_of(train.to_host(variables["params"])))
        return float(grown), grown / 10

    monkeypatch.setattr(Experiment, "evaluate", grown_slots)
    train.run(tiny_config(), str(tmp_path))
    first = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][0]
    assert first["epoch"] == 1 and first["structure_changes"] > 0
    assert first["test_top1_before_adjust"] == 0.0  # before the grow
    assert (first["test_loss"], first["test_top1"]) == (1.0, 0.1)  # after it
    state, meta = train.Trainer(tiny_config(), str(tmp_path)).restore()
    assert meta["best_test_top1"] >= 0.1  # the post-adjust figure entered the ranking


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
    # the same simulated device count as this process: the programs compile alike
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={jax.device_count()}",
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
    # lr 0.02: at 0.05 this tiny net (BN over 16 values at 1x1 in layer4) turns float-order
    # differences of 8 vs 1 devices into a 3e-3 loss difference within 4 steps (measured)
    cfg = dict(num_epochs=1, **{"dyrep.mode": "plain", "dyrep.recal_bn_every_epoch": True,
                                "optim.lr": 0.02})
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


# ----------------------------------------------------------------------------- steps


def fixed_batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            rng.integers(0, 4, (n,), dtype=np.int32))


def grow_two_slots(model, variables):
    from dyrep_jax.dyrep import eligible_slots
    from dyrep_jax.rep import allowed_branches
    from dyrep_jax.rep.introspect import slot_geometries
    from dyrep_jax.rep.network import grow_at

    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    geoms = {k: v.geometry for k, v in slot_geometries(model, variables, x).items()}
    params, stats = variables["params"], variables["batch_stats"]
    for i, path in enumerate(eligible_slots(params)[:2]):
        params, stats = grow_at(jax.random.PRNGKey(i), params, stats, path, geoms[path],
                                allowed_branches(geoms[path]))
    return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("grown", [False, True], ids=["plain", "grown"])
def test_train_steps_lower_the_loss_on_a_fixed_batch(grown):
    from dyrep_jax import models
    from dyrep_jax.optim import cosine_schedule, make_optimizer
    from dyrep_jax.state import new_train_state
    from dyrep_jax.steps import cross_entropy, make_train_step

    model = models.create_model("resnet18_cifar", num_classes=4, width=0.125)
    variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
    if grown:
        variables = grow_two_slots(model, variables)
    mean, std = jnp.full((3,), 0.5), jnp.full((3,), 0.25)
    schedule = cosine_schedule(0.05, 100)
    tx = make_optimizer(schedule=schedule, momentum=0.9)
    step = jax.jit(make_train_step(
        model, tx, schedule, eligible=[], metric="synflow", num_classes=4, label_smoothing=0.0,
        mean=mean, std=std, augment_kind="none", dtype=jnp.float32))
    images, labels = fixed_batch()

    def loss_of(state):  # computed here, not by the step
        x = (jnp.asarray(images, jnp.float32) / 255 - mean) / std
        logits, _ = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                                x, train=True, mutable=["batch_stats"])
        return float(cross_entropy(logits, labels, 4).mean())

    state = new_train_state(variables, tx.init(variables["params"]), num_scores=0)
    before = loss_of(state)
    losses = []
    for i in range(6):
        state, metrics = step(state, images, labels, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(before, rel=1e-4)  # the step reports the loss it took
    assert loss_of(state) < 0.8 * before, (before, losses, loss_of(state))
    assert int(state["step"]) == 6


# ----------------------------------------------------------------------------- resume


def preempting(at):
    """A Trainer.preemption_reached that raises the SIGTERM flag after (epoch, step in epoch)."""
    original = train.Trainer.preemption_reached

    def preemption_reached(self, step):
        epoch, step_in_epoch = at
        if step == epoch * self.exp.inp.steps_per_epoch + step_in_epoch + 1:
            self.preempted = True
        return original(self, step)

    return preemption_reached


def test_resume_between_two_adjustments_is_exact(tmp_path, monkeypatch):
    # adjustments after epochs 2 and 4; snip scores (non-zero, unlike synflow through BN)
    cfg = dict(num_epochs=5, **{"dyrep.adjust_interval": 2, "dyrep.metric": "snip"})
    straight = str(tmp_path / "straight")
    assert train.run(tiny_config(**cfg), straight)["status"] == "done"
    workdir = str(tmp_path / "resumed")
    for at in ((1, 1), (2, 2)):  # preempted in epoch 2 (before the first adjustment), in epoch 3
        with monkeypatch.context() as m:
            m.setattr(train.Trainer, "preemption_reached", preempting(at))
            assert train.run(tiny_config(**cfg), workdir)["status"] == "preempted"
        state, meta = train.Trainer(tiny_config(**cfg), workdir).restore()
        assert (meta["epoch"], meta["step_in_epoch"]) == (at[0], at[1] + 1)
        steps_since_adjust = at[1] + 1 + (4 if at[0] == 1 else 0)  # reset by the adjustment
        assert int(train.to_host(state["score_steps"])) == steps_since_adjust
    assert train.run(tiny_config(**cfg), workdir)["status"] == "done"
    a, _ = final_params(straight, tiny_config(**cfg))
    b, _ = final_params(workdir, tiny_config(**cfg))
    assert_trees_equal(a, b)

    def decisions(d):
        return [json.loads(x) for x in open(os.path.join(d, "structure.jsonl"))]

    ref = decisions(straight)
    assert sorted({r["epoch"] for r in ref}) == [2, 4]
    assert any(r.get("score", 0) > 0 for r in ref)
    assert [(r["slot"], r.get("score"), r.get("top_scores")) for r in decisions(workdir)] == \
        [(r["slot"], r.get("score"), r.get("top_scores")) for r in ref]


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_masks_padding_on_eight_devices():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from dyrep_jax import models
    from dyrep_jax.experiment import Experiment
    from dyrep_jax.steps import cross_entropy

    cfg = tiny_config(num_devices=8, **{"data.dataset": "synthetic:8,8,3,4,64,36"})
    exp = Experiment(cfg, "/tmp/unused-eval-workdir")
    assert exp.place.num_devices == 8 and exp.inp.num_test % cfg.eval_batch_size != 0
    variables = models.init_variables(exp.model, jax.random.PRNGKey(3), exp.image_shape)
    loss, top1 = exp.evaluate(exp.model, exp.place.replicate(variables), "eval")
    rows = [b for b in exp.inp.eval_iter()]
    keep = np.concatenate([np.asarray(b["mask"]) for b in rows]).astype(bool)
    images = np.concatenate([b["image"] for b in rows])[keep]
    labels = np.concatenate([b["label"] for b in rows])[keep]
    assert len(labels) == exp.inp.num_test == 36
    x = (jnp.asarray(images, jnp.float32) / 255 - exp.mean) / exp.std
    logits = exp.model.apply(variables, x, train=False)
    assert top1 == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)), abs=1e-6)
    assert loss == pytest.approx(float(cross_entropy(logits, labels, 4).mean()), rel=1e-5)


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
