"""dyrep_jax.paths on the local disk (the gs:// side is in test_gcs_paths.py)."""

from __future__ import annotations

import os

import fsspec.config

from dyrep_jax import paths


def test_is_local_and_as_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.is_local("runs/a") and not paths.is_local("gs://b/runs/a")
    assert os.fspath(paths.as_path("runs/a")) == os.path.join(str(tmp_path), "runs", "a")
    assert os.fspath(paths.as_path("gs://b/runs/a")) == "gs://b/runs/a"


def test_append_line_creates_appends_and_ends_lines(tmp_path):
    log = tmp_path / "m.jsonl"
    paths.append_line(log, '{"a": 1}')
    paths.append_line(log, '{"a": 2}\n')
    assert log.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_move_aside_counts_up_when_the_name_is_taken(tmp_path):
    for n in range(3):
        (tmp_path / "5").mkdir()
        (tmp_path / "5" / "f").write_text(str(n))
        moved = paths.move_aside(tmp_path / "5", ".broken")
        assert (moved / "f").read_text() == str(n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5.broken", "5.broken.1", "5.broken.2"]


def test_fresh_listings_turns_the_gcs_cache_off_unless_set(monkeypatch):
    monkeypatch.setattr(fsspec.config, "conf", {"gs": {"use_listings_cache": True}})
    paths.fresh_listings()
    assert fsspec.config.conf == {"gs": {"use_listings_cache": True},
                                  "gcs": {"use_listings_cache": False}}


def test_epath_event_file_rewrites_only_when_there_is_news(tmp_path):
    sink = paths.EpathEventFiles().open(os.fspath(tmp_path / "ev"))
    sink.write(b"ab")
    sink.flush()
    (tmp_path / "ev").write_bytes(b"changed elsewhere")
    sink.flush()  # nothing new: no rewrite
    assert (tmp_path / "ev").read_bytes() == b"changed elsewhere"
    sink.write(b"c")
    sink.close()
    assert (tmp_path / "ev").read_bytes() == b"abc"


def test_route_tensorboardx_through_epath_registers_gs_only_by_default():
    from tensorboardX import record_writer

    paths.route_tensorboardx_through_epath()
    assert isinstance(record_writer.REGISTERED_FACTORIES["gs"], paths.EpathEventFiles)
    assert not isinstance(record_writer.REGISTERED_FACTORIES["s3"], paths.EpathEventFiles)
