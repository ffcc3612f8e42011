"""Two processes on localhost (gloo CPU collectives) train in lockstep, like a TPU pod.

Each process reads its own half of every global batch; BN statistics, saliency
and the structure change are computed over the global batch, so both hosts
must hold identical parameters, equal to a single-process run on 2 devices.
A SIGTERM to one host stops both at the same step (orbax's preemption sync
point), and resuming gives the parameters of the uninterrupted run bit for bit.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from train_helpers import tiny_config

from dyrep_jax import train

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 400


def start_pod(workdir, out_dir, tag):
    """Two worker processes on one workdir; their output goes to out_dir/<tag>.<i>.log."""
    port = portpicker.pick_unused_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    logs = [str(out_dir / f"{tag}.{i}.log") for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(port), str(i),
                 str(workdir), str(out_dir / f"{tag}.{i}.npz")],
                stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs, logs


def finish_pod(procs, logs) -> list[tuple[str, int]]:
    """Wait for both workers; (status, latest checkpoint step) of each; both must exit 0."""
    results = []
    for p, path in zip(procs, logs, strict=True):
        p.wait(timeout=TIMEOUT_S)
        out = open(path).read()
        assert p.returncode == 0, out[-4000:]
        done = re.search(r"WORKER_DONE \d (\w+) (\d+)", out)
        assert done, out[-4000:]
        results.append((done.group(1), int(done.group(2))))
    return results


def load_params(path) -> dict:
    return dict(np.load(path))


@pytest.fixture(scope="module")
def pod_run(tmp_path_factory):
    """An uninterrupted 2-process run: (workdir, params of process 0, params of process 1)."""
    out = tmp_path_factory.mktemp("pod")
    workdir = out / "run"
    results = finish_pod(*start_pod(workdir, out, "full"))
    assert [status for status, _ in results] == ["done", "done"]
    return workdir, load_params(out / "full.0.npz"), load_params(out / "full.1.npz")


def test_two_processes_stay_in_lockstep_and_match_single_process(pod_run, tmp_path):
    if jax.device_count() < 2:
        pytest.skip("needs 2 simulated devices for the single-process reference")
    workdir, p0, p1 = pod_run
    assert p0.keys() == p1.keys()
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])  # lockstep: bit-identical on both hosts
    grows = open(os.path.join(workdir, "structure.jsonl")).read()
    assert '"op": "grow"' in grows  # a structure change happened in between

    single_dir = str(tmp_path / "single")
    train.run(tiny_config(num_devices=2), single_dir)
    state, _ = train.Trainer(tiny_config(num_devices=2), single_dir).restore()
    leaves = jax.tree_util.tree_flatten_with_path(train.to_host(state["params"]))[0]
    single = {jax.tree_util.keystr(k): v for k, v in leaves}
    assert single.keys() == p0.keys()  # same structure decisions
    for k in single:
        np.testing.assert_allclose(p0[k], single[k], atol=2e-4, rtol=1e-3, err_msg=k)


def test_sigterm_to_one_host_stops_the_pod_at_one_step_and_resume_is_exact(pod_run, tmp_path):
    _, full, _ = pod_run
    workdir = tmp_path / "run"
    procs, logs = start_pod(workdir, tmp_path, "preempted")
    deadline = time.monotonic() + TIMEOUT_S
    while "epoch 1 step 1/" not in open(logs[1]).read():  # host 1 has taken its first step
        assert procs[1].poll() is None and time.monotonic() < deadline, open(logs[1]).read()
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGTERM)  # host 1 only, as a TPU VM's maintenance notice
    results = finish_pod(procs, logs)
    statuses, steps = zip(*results, strict=True)
    assert statuses == ("preempted", "preempted")
    total_steps = 2 * 4  # tiny_config: 2 epochs of 64 / 16 examples
    assert steps[0] == steps[1] and 1 <= steps[0] < total_steps, results
    stops = [re.findall(r"preempted: checkpoint saved at .*", open(p).read()) for p in logs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # the same step on both hosts

    results = finish_pod(*start_pod(workdir, tmp_path, "resumed"))
    assert results == [("done", total_steps)] * 2
    for i in range(2):
        resumed = load_params(tmp_path / f"resumed.{i}.npz")
        assert resumed.keys() == full.keys()
        for k in full:
            np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
