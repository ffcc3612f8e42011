"""Checkpoint retention (latest N + best), the train state round trip, and old layouts."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from train_helpers import tiny_config

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import train
from dyrep_jax.state import new_train_state

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run_67bf3a2")


def leaf_sums(tree):
    return {jax.tree_util.keystr(k): float(np.asarray(v, np.float64).sum())
            for k, v in jax.tree_util.tree_flatten_with_path(train.to_host(tree))[0]}


def trained_opt_state(tx, params, steps):
    opt = tx.init(params)
    for i in range(steps):  # momentum traces that differ per leaf and per step
        grads = jax.tree_util.tree_map(lambda p, i=i: np.full_like(p, 0.1 * (i + 1)) + p, params)
        _, opt = tx.update(grads, opt, params)
    return opt


def test_keeps_latest_n_and_the_best_and_restores_values(tmp_path):
    mngr = ckpt.make_manager(str(tmp_path), keep=2, async_save=False)
    tx = optax.sgd(0.1, momentum=0.9)
    saved = {}
    for step, acc in zip(range(1, 6), [0.1, 0.9, 0.3, 0.4, 0.5], strict=True):
        # the structure changes between saves: step 3 on has a grown slot
        params = {"conv": {"kernel": np.full((3, 3, 1, 2), step, np.float32)}}
        if step >= 3:
            params = {"conv": {"kxk": {"conv": params["conv"]},
                               "1x1": {"conv": {"kernel": np.ones((1, 1, 1, 2), np.float32)}}}}
        state = new_train_state({"params": params, "batch_stats": {}},
                                trained_opt_state(tx, params, step), num_scores=2, step=step)
        state["scores"] = np.array([step, -step], np.float32)
        state["score_steps"] = np.asarray(step, np.int32)
        saved[step] = state
        ckpt.save(mngr, state, {"epoch": step}, acc)
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [2, 4, 5]
    step, state, meta = ckpt.restore(mngr, tx.init)
    assert step == 5 and meta["epoch"] == 5
    assert set(state["params"]["conv"]) == {"kxk", "1x1"}  # structure came back by itself
    assert leaf_sums(state["params"]) == leaf_sums(saved[5]["params"])
    np.testing.assert_array_equal(state["scores"], [5.0, -5.0])
    assert int(state["score_steps"]) == 5 and int(state["step"]) == 5
    trace = leaf_sums(saved[5]["opt_state"])
    assert any(v != 0 for v in trace.values())
    assert leaf_sums(state["opt_state"]) == trace
    assert ckpt.restore(mngr).state["opt_state"] is None  # params only: no optimizer read


def test_state_without_eligible_slots_round_trips(tmp_path):
    mngr = ckpt.make_manager(str(tmp_path), async_save=False)
    tx = optax.sgd(0.1, momentum=0.9)
    params = {"dense": {"kernel": np.ones((2, 3), np.float32)}}
    state = new_train_state({"params": params, "batch_stats": {}}, tx.init(params),
                            num_scores=0, step=7)
    ckpt.save(mngr, state, {"epoch": 1}, None)
    mngr.wait_until_finished()
    restored = ckpt.restore(mngr, tx.init).state
    assert restored["scores"].shape == (0,) and int(restored["step"]) == 7


def test_arch_record_has_every_field_tools_read(tmp_path):
    arch = ckpt.arch_record(model="resnet18_cifar", num_classes=4, width=0.5, dtype="float32",
                            image_shape=(8, 8, 3), with_bn_after_3x3=False, mean=[0.5] * 3,
                            std=[0.25] * 3, name="x")
    ckpt.write_arch(str(tmp_path), arch)
    back = ckpt.read_arch(str(tmp_path))
    assert back == arch and back["with_bn_after_3x3"] is False
    with open(tmp_path / "arch.json", "w") as f:
        f.write("[1]")
    with pytest.raises(ValueError, match="at least a 'model' field"):
        ckpt.read_arch(str(tmp_path))


def fixture_config():
    return tiny_config(**{"model.width": 0.0625, "checkpoint.keep": 1, "data.augment": "cifar"})


def test_checkpoint_written_by_67bf3a2_restores_and_resumes(tmp_path):
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    run = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run)
    state, meta = train.Trainer(fixture_config(), run).restore()
    assert meta == expected["meta"]
    assert leaf_sums(state["params"]) == expected["params"]
    assert leaf_sums(state["batch_stats"]) == expected["batch_stats"]
    assert leaf_sums(state["opt_state"]) == expected["opt_state"]
    assert list(np.shape(state["scores"])) == expected["scores_shape"]
    assert int(train.to_host(state["step"])) == expected["step"]
    result = train.run(fixture_config(), run)  # resume the old run to its end
    final, _ = train.Trainer(fixture_config(), run).restore()
    got = leaf_sums(final["params"])
    assert got.keys() == expected["resumed"]["params"].keys()
    np.testing.assert_allclose(list(got.values()), list(expected["resumed"]["params"].values()),
                               rtol=1e-5, atol=1e-5)
    assert result["test_top1"] == pytest.approx(expected["resumed"]["test_top1"])


class StuckManager:
    """A checkpoint manager whose background save never finishes (or failed)."""

    directory = "/ckpt"

    def __init__(self, error=None):
        self.error = error

    def wait_until_finished(self):
        if self.error:
            raise self.error
        import time

        time.sleep(3600)

    def check_for_errors(self):
        pass

    def is_saving_in_progress(self):
        return self.error is None


def test_waiting_for_saves_is_bounded_and_names_the_failure(caplog):
    import time

    start = time.time()
    with pytest.raises(ckpt.CheckpointError, match="still running after 0s"):
        ckpt.wait_for_saves(StuckManager(), timeout_s=0.2)
    assert time.time() - start < 5
    failed = StuckManager(OSError(28, "No space left on device"))
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*training stopped"):
        ckpt.check_saves(failed)
    ckpt.wait_for_saves(failed, raise_errors=False)  # the run fails already: logged only
    assert "No space left on device" in caplog.text


def test_broken_steps_are_moved_aside_never_over_each_other(tmp_path):
    for n in range(2):
        (tmp_path / "8" / "state").mkdir(parents=True)
        (tmp_path / "8" / "state" / "x").write_text(str(n))
        moved = ckpt.move_broken_step(str(tmp_path), 8)
        assert moved.name == ("8" if n == 0 else "8.1") and moved.parent.name == "broken"
    assert (tmp_path / "broken" / "8" / "state" / "x").read_text() == "0"
    assert not (tmp_path / "8").exists()
