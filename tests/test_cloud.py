"""The command line on a `gs://` workdir (local GCS emulator), and its logging flags.

`python -m dyrep_jax.main` runs as a subprocess that inherits the emulator's
environment: train, resume, export and eval of the fused export alone, with
every file checked on the emulator's side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from event_files import read_run, scalars
from gcs_emulator import gcs_dir, gcs_emulator  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(ROOT, "configs", "quickstart.py"),
        "--config.data.dataset=synthetic:8,8,3,4,64,32", "--config.model.width=0.125",
        "--config.batch_size=16", "--config.eval_batch_size=16", "--config.dyrep.mode=plain",
        "--config.log_every_steps=2"]


def cli(*args, cwd, check=True) -> str:
    """Run `python -m dyrep_jax.main` with `args`; its stdout + stderr."""
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "dyrep_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out[-4000:]
    return out


def test_train_resume_export_and_eval_on_gcs(gcs_dir, gcs_emulator, tmp_path):  # noqa: F811
    run = str(gcs_dir / "run")
    out = cli(*TINY, "--workdir", run, "--config.num_epochs=1", cwd=tmp_path)
    assert "done: {'status': 'done'" in out, out[-3000:]
    config = json.loads((gcs_dir / "run" / "config.json").read_text())
    assert config["num_epochs"] == 1 and config["dyrep"]["mode"] == "plain"

    out = cli(*TINY, "--workdir", run, "--config.num_epochs=2", cwd=tmp_path)
    assert "resumed from step 4 (epoch 1, step 0 in epoch)" in out, out[-3000:]
    text = (gcs_dir / "run" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert [r.get("epoch") for r in records] == [1, 2, None]  # the first final line was dropped
    assert records[-1]["final"]
    tb = scalars(read_run(gcs_dir / "run" / "tb"))
    assert [s for s, _ in tb["eval/top1"]] == [4, 8]  # one event file per run, both on gs://
    assert (gcs_dir / "run" / "structure.png").read_bytes()[:4] == b"\x89PNG"

    (gcs_dir / "run" / "fused" / "model.jaxexport").unlink()
    out = cli(*TINY, "--workdir", run, "--config.num_epochs=2", "--mode=export", cwd=tmp_path)
    from dyrep_jax import serving

    exported = serving.load_exported(gcs_dir / "run" / "fused" / serving.EXPORT_FILE)
    assert serving.exported_image_shape(exported) == (8, 8, 3)
    logits = exported.call(np.zeros((3, 8, 8, 3), np.float32))
    assert logits.shape == (3, 4)

    out = cli(*TINY, "--workdir", f"{run}/fused", "--mode=eval", cwd=tmp_path)
    arch = json.loads((gcs_dir / "run" / "fused" / "arch.json").read_text())
    assert f"'fused_test_top1': {arch['test_top1']}" in out, out[-3000:]

    prefix = os.fspath(gcs_dir).split("/", 3)[3] + "/run/"
    names = gcs_emulator.object_names(prefix)
    for expected in ("config.json", "metrics.jsonl", "structure.jsonl", "structure.png",
                     "fused/arch.json", "fused/model.jaxexport", "checkpoints/8/meta/metadata"):
        assert prefix + expected in names, (expected, names)
    assert any(n.startswith(prefix + "tb/events.out.tfevents.") for n in names)
    assert any(n.startswith(prefix + "fused/params/") for n in names)
    assert not (tmp_path / "gs:").exists()  # nothing went to a local folder named gs:


@pytest.fixture(scope="module")
def no_checkpoint_run(tmp_path_factory):
    """A workdir without checkpoints: --mode=eval logs its device line, then fails fast."""
    return tmp_path_factory.mktemp("empty")


def test_default_logging_is_our_info_lines_on_stdout(no_checkpoint_run):
    out = cli(*TINY, "--workdir", str(no_checkpoint_run), "--mode=eval",
              cwd=no_checkpoint_run, check=False)
    assert "devices: 1 (cpu), processes: 1" in out
    assert "no checkpoint in" in out


def test_verbosity_and_log_dir(no_checkpoint_run, tmp_path):
    out = cli(*TINY, "--workdir", str(no_checkpoint_run), "--mode=eval", "--verbosity=-1",
              f"--log_dir={tmp_path / 'logs'}", cwd=no_checkpoint_run, check=False)
    assert "devices:" not in out  # INFO lines are off at --verbosity=-1 (warnings only)
    assert "no checkpoint in" in out
    out = cli(*TINY, "--workdir", str(no_checkpoint_run), "--mode=eval", "--verbosity=0",
              f"--log_dir={tmp_path / 'logs'}", cwd=no_checkpoint_run, check=False)
    assert "devices: 1 (cpu)" in out
    logged = "".join(p.read_text() for p in (tmp_path / "logs").glob("dyrep_jax.*INFO*"))
    assert "devices: 1 (cpu)" in logged


def test_eval_finds_a_fused_export_only_where_no_checkpoint_is(tmp_path):
    from dyrep_jax.experiment import fused_only_dir

    run = tmp_path / "run"
    (run / "fused").mkdir(parents=True)
    assert fused_only_dir(run) is None  # no arch.json yet: not an export
    (run / "fused" / "arch.json").write_text('{"model": "resnet18_cifar"}')
    assert str(fused_only_dir(run)) == str(run / "fused")  # a run with only fused/ left
    assert str(fused_only_dir(run / "fused")) == str(run / "fused")  # the export itself
    (run / "checkpoints").mkdir()
    assert fused_only_dir(run) is None  # checkpoints win: eval the latest one, as before
