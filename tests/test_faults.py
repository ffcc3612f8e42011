"""Faults: identity checks, refused configs, the workdir lock, save failures, error output."""

import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import pytest
from train_helpers import tiny_config, write_config_file

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import evaluate, train
from dyrep_jax.data import DataError
from dyrep_jax.errors import (
    EXPECTED_ERRORS,
    CheckpointError,
    ConfigError,
    NoCheckpointError,
    TrainingError,
    WorkdirError,
)
from dyrep_jax.experiment import validate_config
from dyrep_jax.identity import check_identity
from dyrep_jax.workdir_lock import WorkdirLockedError, lock_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run_67bf3a2")
CACHE = os.path.abspath(os.environ.get("DYREP_TEST_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))
ONE_EPOCH = {"num_epochs": 1}


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """One tiny epoch (DyRep grows a slot after it): a checkpoint to restore in many tests."""
    workdir = str(tmp_path_factory.mktemp("one_epoch"))
    return workdir, train.run(tiny_config(**ONE_EPOCH), workdir)


def run_main(args, timeout=300, env=None):
    """`python -m dyrep_jax.main ARGS`: (returncode, stdout + stderr, seconds)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "dyrep_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": "", **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


# ----------------------------------------------------------------------------- 1. identity


def test_checkpoint_records_identity_settings_and_run_id(one_epoch_run):
    workdir, _ = one_epoch_run
    meta = ckpt.restore_dir(os.path.join(workdir, "checkpoints")).meta
    assert meta["identity"] == {"model": "resnet18_cifar", "width": 0.125, "num_classes": 4,
                                "mode": "dyrep", "image_shape": [8, 8, 3],
                                "dataset": "synthetic:8,8,3,4,64,32", "bn_group_size": 0}
    assert meta["settings"]["num_epochs"] == 1 and meta["settings"]["steps_per_epoch"] == 4
    assert isinstance(meta["run_id"], str) and len(meta["run_id"]) > 8


@pytest.mark.parametrize("override, field, theirs, ours", [
    ({"model.width": 0.25}, "width", "0.125", "0.25"),
    ({"dyrep.mode": "dbb"}, "mode", "'dyrep'", "'dbb'"),
    ({"model.name": "vgg16_cifar"}, "model", "'resnet18_cifar'", "'vgg16_cifar'"),
])
def test_resume_refuses_another_network_naming_the_field(one_epoch_run, override, field,
                                                         theirs, ours):
    workdir, _ = one_epoch_run
    trainer = train.Trainer(tiny_config(**ONE_EPOCH, **override), workdir)
    flag = next(iter(override))
    with pytest.raises(CheckpointError, match=rf"{field} is {theirs} there but {ours} in this "
                                              rf"config \({flag}\).*another --workdir"):
        trainer.restore()


def test_eval_and_export_refuse_another_network(one_epoch_run):
    workdir, _ = one_epoch_run
    for command in (evaluate.evaluate_latest, evaluate.export_latest):
        with pytest.raises(CheckpointError, match=r"width is 0.125 there but 0.25"):
            command(tiny_config(**ONE_EPOCH, **{"model.width": 0.25}), workdir)


def test_resume_logs_changed_settings_and_refuses_a_new_batch_size(one_epoch_run, caplog):
    workdir, _ = one_epoch_run
    with caplog.at_level(logging.INFO, logger="dyrep_jax"):
        train.Trainer(tiny_config(num_epochs=3, **{"optim.lr": 0.01}), workdir).restore()
    assert "resuming with changed settings: lr 0.05 -> 0.01, num_epochs 1 -> 3" in caplog.text
    with pytest.raises(CheckpointError, match="4 steps per epoch, this config has 2"):
        train.Trainer(tiny_config(batch_size=32, **ONE_EPOCH), workdir).restore()


def test_identity_check_names_a_new_dataset_first_and_ignores_json_number_types():
    saved = {"model": "m", "dataset": "cifar10", "width": 1, "num_classes": 10, "mode": "dyrep",
             "image_shape": [32, 32, 3], "bn_group_size": 0}
    meta = {"identity": saved, "settings": {"steps_per_epoch": 5}}
    same = {**saved, "width": 1.0, "image_shape": (32, 32, 3)}
    check_identity(meta, same, {"steps_per_epoch": 5}, "here", resuming=True)
    other = {**same, "dataset": "cifar100", "num_classes": 100}
    with pytest.raises(CheckpointError, match=r"dataset is 'cifar10' there but 'cifar100'.*"
                                              r"--config.data.dataset=\.\.\."):
        check_identity(meta, other, {"steps_per_epoch": 5}, "here", resuming=False)
    check_identity(meta, same, {"steps_per_epoch": 9}, "here", resuming=False)  # eval: any batch


def test_checkpoint_without_identity_restores_with_a_log_line(tmp_path, caplog):
    run = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run)
    config = tiny_config(**{"model.width": 0.0625, "checkpoint.keep": 1})
    with caplog.at_level(logging.INFO, logger="dyrep_jax"):
        _, meta = train.Trainer(config, run).restore()
    assert "identity" not in meta and "predates identity records" in caplog.text
    with pytest.raises(CheckpointError, match="model is 'resnet18_cifar' there"):
        train.Trainer(tiny_config(**{"model.name": "vgg16_cifar"}), run).restore()


# ----------------------------------------------------------------------------- 4, 8, 9


@pytest.mark.parametrize("field, value, match", [
    ("checkpoint.keep", 0, "'checkpoint.keep' must be >= 1, got 0"),
    ("log_every_steps", 0, "'log_every_steps' must be >= 1"),
    ("model.width", -0.5, "'model.width' must be > 0"),
    ("data.random_erasing", 1.5, r"'data.random_erasing' must be in \[0, 1\]"),
    ("optim.lr", 0.0, "'optim.lr' must be > 0"),
    ("dyrep.calib_batches", 0, "'dyrep.calib_batches' must be >= 1"),
    ("batch_size", 0, "'batch_size' must be >= 1"),
    ("num_devices", 99, "num_devices=99 but this host has"),
    ("model.name", "resnet19", "unknown model.name 'resnet19'"),
])
def test_bad_values_are_refused_before_anything_is_created(tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_config(**{field: value}))
    with pytest.raises(ConfigError, match=match):
        train.run(tiny_config(**{field: value}), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_devices_that_do_not_divide_the_batch_and_bad_data_create_nothing(tmp_path):
    if jax.device_count() < 2:
        pytest.skip("needs 2 simulated devices")
    with pytest.raises(ConfigError, match="must be divisible by the 2 devices"):
        train.run(tiny_config(batch_size=15, num_devices=2), str(tmp_path / "w"))
    with pytest.raises(DataError):
        train.run(tiny_config(**{"data.dataset": f"npz:{tmp_path}/nope.npz"}),
                  str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")
    assert issubclass(DataError, EXPECTED_ERRORS) and issubclass(WorkdirLockedError,
                                                                 EXPECTED_ERRORS)


def test_eval_on_an_empty_workdir_creates_nothing(tmp_path):
    with pytest.raises(NoCheckpointError, match="train first"):
        evaluate.evaluate_latest(tiny_config(), str(tmp_path / "none"))
    with pytest.raises(NoCheckpointError):
        evaluate.export_latest(tiny_config(), str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")


def test_a_file_as_workdir_or_checkpoint_dir_is_named(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(WorkdirError, match="is a file; expected a directory"):
        train.run(tiny_config(), str(path))
    with pytest.raises(CheckpointError, match="is a file; expected a checkpoints directory"):
        ckpt.restore_dir(str(path))
    with pytest.raises(WorkdirError, match="cannot write the workdir"):  # a file in the path
        train.run(tiny_config(), str(path / "run"))


def test_nan_advice_names_only_what_exists_and_helps(tmp_path):
    with pytest.raises(TrainingError, match="No checkpoint was saved yet") as info:
        train.run(tiny_config(debug_fail_at_step=1, **ONE_EPOCH), str(tmp_path / "a"))
    assert "is kept" not in str(info.value) and "model.dtype" not in str(info.value)
    bf16 = train.Trainer(tiny_config(**{"model.dtype": "bfloat16", "optim.grad_clip_norm": 1.0}),
                         str(tmp_path / "b"))
    advice = bf16.nan_advice()
    assert "model.dtype=float32" in advice and "grad_clip_norm" not in advice


# ----------------------------------------------------------------------------- 7. lock


def test_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "w")
    with lock_workdir(workdir) as held:
        start = time.time()
        with pytest.raises(WorkdirLockedError, match=f"in use by run {held.run_id} "
                                                     f"\\(pid {os.getpid()}"):
            train.run(tiny_config(), workdir)
        assert time.time() - start < 60
    assert os.listdir(workdir) == []  # nothing written, the lock released


def test_export_takes_the_workdir_lock(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run)
    config = tiny_config(**{"model.width": 0.0625})
    with lock_workdir(run), pytest.raises(WorkdirLockedError, match="in use by run"):
        evaluate.export_latest(config, run)
    assert not os.path.exists(os.path.join(run, "fused"))


# ----------------------------------------------------------------------------- 8. main's output


def test_main_prints_expected_errors_in_one_line_and_exits_1(tmp_path):
    config = write_config_file(tmp_path / "cfg.py")
    workdir = str(tmp_path / "w")
    rc, out, _ = run_main(["--config", config, "--workdir", workdir,
                           "--config.log_every_steps=0"])
    assert rc == 1 and "error: config field 'log_every_steps' must be >= 1, got 0" in out
    assert "Traceback" not in out and not os.path.exists(workdir)
    rc, out, _ = run_main(["--config", str(tmp_path / "nope.py"), "--workdir", workdir])
    assert rc == 1 and "error: cannot load --config" in out and "No such file" in out
    assert "Traceback" not in out
    rc, out, _ = run_main(["--config", config, "--workdir", workdir, "--mode=eval"],
                          env={"DYREP_TRACEBACK": "1"})
    assert rc == 1 and "Traceback" in out and "NoCheckpointError: no checkpoint" in out
    assert not os.path.exists(workdir)


# ----------------------------------------------------------------------------- 3. failed save

FAILING_SAVE = """
import errno, sys
from orbax.checkpoint._src.path import async_path
real_mkdir = async_path.mkdir

async def mkdir(path, *args, **kwargs):  # the disk fills up at the second checkpoint (step 8)
    if any(part.startswith("8.orbax-checkpoint-tmp") for part in str(path).split("/")):
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
    return await real_mkdir(path, *args, **kwargs)

async_path.mkdir = mkdir
sys.argv = ["dyrep-jax"] + sys.argv[1:]
from dyrep_jax.main import entry
entry()
"""


def test_a_failed_background_save_stops_the_run_with_status_1(tmp_path):
    config = write_config_file(tmp_path / "cfg.py", num_epochs=3, compilation_cache_dir=CACHE,
                               **{"dyrep.mode": "plain", "checkpoint.async_save": True})
    workdir = str(tmp_path / "w")
    script = tmp_path / "failing_save.py"
    script.write_text(FAILING_SAVE)
    start = time.time()
    proc = subprocess.run([sys.executable, str(script), "--config", config, "--workdir", workdir],
                          cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert time.time() - start < 400
    assert "error: saving the checkpoint" in out or "error: saving a checkpoint" in out, out[-3000:]
    assert "No space left on device (injected)" in out and "training stopped" in out
    assert "epoch 3 step 2/" not in out, out[-6000:]  # stopped within a step of noticing, not an epoch later
    found = ckpt.restore_dir(os.path.join(workdir, "checkpoints"))
    assert found.step == 4 and found.meta["epoch"] == 1  # the earlier checkpoint is intact
