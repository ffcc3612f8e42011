"""The libraries a workdir uses, on real `gs://` paths served by a local GCS emulator.

Proves: etils.epath (via gcsfs) file operations, tensorstore's gcs driver,
orbax CheckpointManager / StandardCheckpointer round trips, TensorBoard
scalars, and `dyrep_jax.paths` helpers. Every test also asks the emulator's
JSON API directly which objects exist, so nothing passes by writing locally.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from event_files import read_events
from gcs_emulator import gcs_dir, gcs_emulator  # noqa: F401  (fixtures)

from dyrep_jax import paths


def prefix_of(path) -> str:
    """The object-name prefix of a `gs://bucket/...` path."""
    return os.fspath(path).split("/", 3)[3] + "/"


@pytest.fixture(autouse=True)
def no_local_gs_folder(tmp_path, monkeypatch):
    """Run in an empty cwd and check afterwards that no local `gs:` folder appeared."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local folder"


def test_epath_gs_goes_through_gcsfs_to_the_emulator(gcs_emulator):  # noqa: F811
    from etils.epath import backend

    path = gcs_emulator.path("x")
    assert importlib.util.find_spec("tensorflow") is None, (
        "TensorFlow is installed: etils then sends gs:// to tf.io.gfile, not gcsfs")
    assert path._backend is backend.fsspec_backend
    fs = backend.fsspec_backend.fs(os.fspath(path))
    assert type(fs).__module__ == "gcsfs.core"
    assert fs._location == gcs_emulator.url


def test_a_child_process_reaches_the_same_emulator(gcs_dir):  # noqa: F811
    target = os.fspath(gcs_dir / "from_child.txt")
    code = f"from etils import epath; epath.Path({target!r}).write_text('hi')"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (gcs_dir / "from_child.txt").read_text() == "hi"


def test_epath_file_operations(gcs_dir, gcs_emulator):  # noqa: F811
    run = gcs_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    assert not run.exists(), "GCS folders are virtual: an empty one does not exist"
    (run / "a.json").write_text('{"x": 1}')
    (run / "sub" / "b.txt").write_text("b")
    assert run.is_dir() and (run / "a.json").exists()
    assert json.loads((run / "a.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in run.iterdir()) == ["a.json", "sub"]
    assert [p.name for p in run.glob("*.json")] == ["a.json"]
    assert gcs_emulator.object_names(prefix_of(run)) == [
        prefix_of(run) + "a.json", prefix_of(run) + "sub/b.txt"]
    (run / "sub").rename(run / "sub.old")
    assert (run / "sub.old" / "b.txt").read_text() == "b" and not (run / "sub").exists()
    (run / "a.json").unlink()
    (run / "sub.old").rmtree()
    assert gcs_emulator.object_names(prefix_of(run)) == []


def test_open_append_on_gcs_overwrites_so_append_line_rewrites(gcs_dir, gcs_emulator):  # noqa: F811
    log = gcs_dir / "metrics.jsonl"
    log.write_text("first\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with log.open("a") as f:
            f.write("second\n")
    assert log.read_text() == "second\n", "gcsfs 'a' mode is an overwrite"
    assert any("Append mode" in str(w.message) for w in caught)
    log.unlink()
    for i in range(3):
        paths.append_line(log, json.dumps({"step": i}))
    assert [json.loads(s)["step"] for s in log.read_text().splitlines()] == [0, 1, 2]
    assert gcs_emulator.object_names(prefix_of(gcs_dir)) == [prefix_of(gcs_dir) + "metrics.jsonl"]


def test_move_aside_renames_a_step_folder(gcs_dir):  # noqa: F811
    for n in (1, 2):
        (gcs_dir / "7" / "state" / "data").write_text(str(n))
        moved = paths.move_aside(gcs_dir / "7", ".broken")
        assert moved.name == ("7.broken" if n == 1 else "7.broken.1")
        assert (moved / "state" / "data").read_text() == str(n)
    assert sorted(p.name for p in gcs_dir.iterdir()) == ["7.broken", "7.broken.1"]


def test_tensorstore_gcs_driver_reads_back(gcs_dir, gcs_emulator):  # noqa: F811
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": os.fspath(gcs_dir / "arr") + "/"}
    arr = ts.open(spec, create=True, dtype=ts.float32, shape=[2, 3]).result()
    arr.write(np.arange(6, dtype=np.float32).reshape(2, 3)).result()
    again = ts.open(spec).result().read().result()
    np.testing.assert_array_equal(again, np.arange(6).reshape(2, 3))
    assert prefix_of(gcs_dir) + "arr/.zarray" in gcs_emulator.object_names(prefix_of(gcs_dir))


def make_manager(directory):
    import orbax.checkpoint as ocp

    cm = ocp.checkpoint_managers
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(2), cm.BestN(get_metric_fn=lambda m: m["acc"], reverse=False, n=1)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory, options=options)


def test_orbax_manager_saves_keeps_restores_and_deletes_on_gcs(gcs_dir, gcs_emulator):  # noqa: F811
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    directory = gcs_dir / "checkpoints"
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": {"n": jnp.ones(3, jnp.int32)}}
    with make_manager(directory) as manager:
        for step, acc in [(1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3)]:
            state = {"w": tree["w"] + step, "b": tree["b"]}
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step})),
                metrics={"acc": acc})
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 3, 4], "LatestN(2) + BestN(1) keep 3, 4 and 1"
    with make_manager(directory) as restarted:  # a new process would see the same
        assert restarted.all_steps() == [1, 3, 4] and restarted.latest_step() == 4
        out = restarted.restore(4, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore()))
        np.testing.assert_array_equal(out["state"]["w"], np.arange(6.0).reshape(2, 3) + 4)
        assert out["meta"] == {"step": 4}
        restarted.delete(3)
        assert restarted.all_steps() == [1, 4]
    names = gcs_emulator.object_names(prefix_of(directory))
    assert {n.split("/")[0] for n in (s[len(prefix_of(directory)):] for s in names)} == {"1", "4"}


def test_standard_checkpointer_and_arch_json_for_fused_export(gcs_dir):  # noqa: F811
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    fused = gcs_dir / "fused"
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(fused / "params", params)
    (fused / "arch.json").write_text(json.dumps({"blocks": 2}))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(fused / "params")
    np.testing.assert_array_equal(restored["conv"]["kernel"], np.ones((3, 3, 2, 4)))
    assert json.loads((fused / "arch.json").read_text()) == {"blocks": 2}


def read_event_scalars(data: bytes) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TFRecord event file, CRCs checked."""
    return [(e.step, v.tag, v.simple_value) for e in read_events(data) for v in e.summary.value
            if v.WhichOneof("value") == "simple_value"]


def test_tensorboardx_scalars_reach_gcs_through_epath(gcs_dir, gcs_emulator):  # noqa: F811
    from tensorboardX import SummaryWriter

    paths.route_tensorboardx_through_epath()
    writer = SummaryWriter(os.fspath(gcs_dir / "tb"))
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.flush()
    writer.add_scalar("test/top1", 0.5, 3)
    writer.close()
    files = list((gcs_dir / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    got = read_event_scalars(files[0].read_bytes())
    assert got == [(0, "train/loss", 1.0), (1, "train/loss", 0.5),
                   (2, "train/loss", pytest.approx(1 / 3)), (3, "test/top1", 0.5)]
    assert gcs_emulator.object_names(prefix_of(gcs_dir)) == [prefix_of(files[0])[:-1]]
