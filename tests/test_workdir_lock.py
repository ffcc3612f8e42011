"""The workdir lock: one run per workdir, holder named, stale locks taken over, released on exit."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from dyrep_jax import workdir_lock
from dyrep_jax.workdir_lock import (
    LOCK_FILE,
    WorkdirLock,
    WorkdirLockedError,
    lock_workdir,
    process_start_ticks,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECOND_RUN = """
import sys
from dyrep_jax.workdir_lock import WorkdirLock, WorkdirLockedError
try:
    WorkdirLock(sys.argv[1], run_id="second").acquire()
except WorkdirLockedError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
print("acquired")
"""


def second_process(workdir):
    return subprocess.run([sys.executable, "-c", SECOND_RUN, str(workdir)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def write_lock(workdir, **fields):
    holder = {"host": socket.gethostname(), "pid": 1, "pid_start": None, "run_id": "old",
              "started": "2020-01-01T00:00:00Z", **fields}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "w") as f:
        json.dump(holder, f)


def read_lock(workdir):
    with open(os.path.join(workdir, LOCK_FILE)) as f:
        return json.load(f)


def test_second_process_fails_at_once_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(workdir, run_id="first") as lock:
        assert lock.held and read_lock(workdir)["pid"] == os.getpid()
        second = second_process(workdir)
        assert second.returncode == 3, second.stderr
        message = second.stderr.strip()
        assert "run first" in message and f"pid {os.getpid()}" in message
        assert socket.gethostname() in message and "another --workdir" in message
        assert read_lock(workdir)["run_id"] == "first"  # the loser left the lock alone
    assert not os.path.exists(workdir / LOCK_FILE)
    assert "acquired" in second_process(workdir).stdout  # free again once released


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid, run_id="crashed")
    with caplog.at_level(logging.WARNING, logger="dyrep_jax"):
        with WorkdirLock(tmp_path, run_id="new"):
            assert read_lock(tmp_path)["run_id"] == "new"
    assert "run crashed" in caplog.text and "taking it over" in caplog.text


def test_reused_pid_counts_as_dead_but_a_live_holder_does_not(tmp_path):
    # Our own pid with another start time: the pid was reused by a newer process.
    write_lock(tmp_path, pid=os.getpid(), pid_start=process_start_ticks(os.getpid()) - 1)
    with WorkdirLock(tmp_path, run_id="new"):
        assert read_lock(tmp_path)["run_id"] == "new"
    write_lock(tmp_path, pid=os.getpid(), pid_start=process_start_ticks(os.getpid()))
    with pytest.raises(WorkdirLockedError, match="run old"):
        WorkdirLock(tmp_path).acquire()


def test_holder_on_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, host="some-other-host", pid=999999)
    with pytest.raises(WorkdirLockedError) as err:
        WorkdirLock(tmp_path).acquire()
    message = str(err.value)
    assert "some-other-host" in message and "another host" in message
    assert f"delete {tmp_path / LOCK_FILE}" in message


def test_released_on_error_and_never_removes_another_runs_lock(tmp_path):
    with pytest.raises(ValueError):
        with WorkdirLock(tmp_path, run_id="failing"):
            raise ValueError("training failed")
    assert not os.path.exists(tmp_path / LOCK_FILE)
    lock = WorkdirLock(tmp_path, run_id="mine").acquire()
    write_lock(tmp_path, run_id="someone-else", pid=os.getpid())  # replaced behind our back
    lock.release()
    assert read_lock(tmp_path)["run_id"] == "someone-else"


def test_single_process_is_primary_and_gets_a_run_id(tmp_path):
    lock = lock_workdir(tmp_path / "new" / "run")
    assert lock.primary and not lock.held and len(lock.run_id) > 8
    with lock:
        holder = read_lock(tmp_path / "new" / "run")
        assert holder["run_id"] == lock.run_id and holder["pid"] == os.getpid()
    secondary = WorkdirLock(tmp_path / "other", run_id="x", primary=False)
    with secondary:
        assert not os.path.exists(tmp_path / "other" / LOCK_FILE)


POD_WORKER = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, index, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=index)
from jax.experimental import multihost_utils
from dyrep_jax.workdir_lock import LOCK_FILE, lock_workdir
with lock_workdir(workdir, run_id=f"proposed-by-{index}") as lock:
    multihost_utils.sync_global_devices("locked")
    with open(os.path.join(workdir, LOCK_FILE)) as f:
        holder = json.load(f)
    print("RESULT", json.dumps({"run_id": lock.run_id, "held": lock.held,
                                "holder_pid": holder["pid"], "pid": os.getpid()}), flush=True)
    multihost_utils.sync_global_devices("read")
"""


def test_multi_host_primary_holds_the_lock_and_every_process_shares_its_run_id(tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", POD_WORKER, str(port), str(i),
                               str(tmp_path)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(out.split("RESULT", 1)[1].splitlines()[0]))
    assert [r["held"] for r in results] == [True, False]
    assert results[0]["run_id"] == results[1]["run_id"] == "proposed-by-0"
    assert results[0]["holder_pid"] == results[1]["holder_pid"] == results[0]["pid"]
    assert not os.path.exists(tmp_path / LOCK_FILE)


def test_cloud_paths_take_the_lock_by_write_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "is_local", lambda path: False)  # no O_EXCL (gs://)
    with WorkdirLock(tmp_path, run_id="cloud") as lock:
        assert lock.held and read_lock(tmp_path)["run_id"] == "cloud"
        with pytest.raises(WorkdirLockedError, match="run cloud"):
            WorkdirLock(tmp_path, run_id="second").acquire()
    assert not os.path.exists(tmp_path / LOCK_FILE)
