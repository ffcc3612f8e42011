"""What a run records: DIR/config.json, TensorBoard scalars/text/hparams at the global step, a profile."""

from __future__ import annotations

import json

import pytest
from event_files import hparams, read_run, scalars, texts
from train_helpers import tiny_config

from dyrep_jax import train
from dyrep_jax.experiment import validate_config
from dyrep_jax.optim import make_schedule

STEPS_PER_EPOCH = 4  # tiny_config: 64 training examples, batch 16


def config():
    return tiny_config(log_every_steps=2, profile_steps="3,4")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, TensorBoard events, metrics.jsonl records) of one tiny 2-epoch run."""
    workdir = tmp_path_factory.mktemp("records")
    assert train.run(config(), str(workdir))["status"] == "done"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, read_run(workdir / "tb"), records


def test_config_json_is_the_resolved_config(run):
    workdir, _, _ = run
    assert json.loads((workdir / "config.json").read_text()) == config().to_dict()


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_hparams_hold_the_flattened_config(run):
    _, events, _ = run
    got = hparams(events)
    assert got == flatten(config().to_dict())
    assert got["optim.lr"] == 0.05 and got["checkpoint.async_save"] is False


def test_train_scalars_every_log_every_steps_at_the_global_step(run):
    _, events, records = run
    got = scalars(events)
    for tag in ("train/loss", "train/top1", "train/lr", "train/images_per_s"):
        assert [step for step, _ in got[tag]] == [2, 4, 6, 8], tag
    # Each value is the mean over its 2 steps: two windows average to the epoch's mean.
    for epoch in (1, 2):
        window = [v for s, v in got["train/loss"] if (epoch - 1) * 4 < s <= epoch * 4]
        assert sum(window) / 2 == pytest.approx(records[epoch - 1]["train_loss"], rel=1e-5)
        window = [v for s, v in got["train/top1"] if (epoch - 1) * 4 < s <= epoch * 4]
        assert sum(window) / 2 == pytest.approx(records[epoch - 1]["train_top1"], rel=1e-5)
    schedule = make_schedule(config().optim, STEPS_PER_EPOCH, config().num_epochs)
    for step, lr in got["train/lr"]:  # the lr of the window's last step (step - 1 from 0)
        assert lr == pytest.approx(float(schedule(step - 1)), rel=1e-5)
    assert all(v > 0 for _, v in got["train/images_per_s"])


def test_eval_and_structure_scalars_and_text_at_the_epoch_end_step(run):
    _, events, records = run
    got = scalars(events)
    epochs = [r for r in records if not r.get("final")]
    for tag, field in (("eval/top1", "test_top1"), ("eval/loss", "test_loss"),
                       ("structure/params", "params"), ("structure/macs", "macs"),
                       ("structure/blocks", "grown_slots")):
        assert got[tag] == [(r["epoch"] * STEPS_PER_EPOCH, pytest.approx(r[field], rel=1e-6))
                            for r in epochs], tag
    assert got["structure/blocks"][0][1] >= 1  # tiny_config grows a block after epoch 1
    changed = [r["epoch"] * STEPS_PER_EPOCH for r in epochs if r["structure_changes"]]
    text = texts(events)["structure"]
    assert [step for step, _ in text] == changed
    assert text[0][1].startswith("grow ")
    final = records[-1]
    assert got["final/fused_test_top1"] == [(8, pytest.approx(final["fused_test_top1"]))]


def test_profile_steps_capture_a_trace(run):
    workdir, _, _ = run
    assert list((workdir / "profile").rglob("*.xplane.pb"))


@pytest.mark.parametrize("bad", ["5", "4,2", "0,3", "a,b"])
def test_bad_profile_steps_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="profile_steps must be 'A,B'"):
        validate_config(tiny_config(profile_steps=bad))
