"""Program cache: one compile per structure, compiles in threads, honest wall seconds."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from train_helpers import tiny_config

from dyrep_jax import train
from dyrep_jax.programs import CompileClock, ProgramCache, abstract
from dyrep_jax.steps import batch_specs


def test_overlapping_compiles_count_once_on_the_clock():
    clock = CompileClock()
    clock.start()
    time.sleep(0.2)
    clock.start()  # a second compile while the first runs
    time.sleep(0.2)
    clock.stop()
    time.sleep(0.1)
    clock.stop()
    # wall time with at least one compile running: ~0.5 s, not the 0.7 s of both threads
    assert 0.45 <= clock.seconds < 0.65
    before = clock.seconds
    time.sleep(0.05)
    assert clock.seconds == before  # nothing runs: the clock stands still


def test_clock_since_a_mark_reports_wall_wait_and_thread_seconds_by_kind():
    clock = CompileClock()
    clock.add_compile("train", 9.0)
    mark = clock.mark()
    clock.start()
    time.sleep(0.1)
    clock.stop()
    clock.add_compile("train", 1.5)
    clock.add_compile(("calibrate_block", "geometry"), 0.5)
    clock.add_wait(0.25)
    got = clock.since(mark)
    assert got["compile_thread_s"] == {"calibrate_block": 0.5, "train": 1.5}
    assert got["compile_wait_s"] == 0.25 and 0.09 <= got["compile_s_total"] < 0.3


def test_prefetch_then_get_compiles_once_and_runs_like_jit():
    cache = ProgramCache(clock=CompileClock())

    def fn(x, y):
        return jnp.tanh(x) @ y

    x, y = jnp.ones((4, 3)), jnp.arange(6.0).reshape(3, 2)
    future = cache.prefetch("f", fn, (jax.ShapeDtypeStruct(x.shape, x.dtype), y))
    compiled = cache.get("f", fn, (x, y))
    assert future.result() is compiled and len(cache.compile_log) == 1
    np.testing.assert_allclose(compiled(x, y), jax.jit(fn)(x, y), rtol=1e-6)
    cache.get("f", fn, (x, jnp.ones((3, 5))))  # a new shape is a new program
    assert [name for name, _ in cache.compile_log] == ["f", "f"]
    cache.drop("f")
    cache.get("f", fn, (x, y))
    assert len(cache.compile_log) == 3 and cache.compile_seconds > 0


def test_compiles_run_in_worker_threads_and_errors_reach_the_caller():
    cache = ProgramCache(clock=CompileClock())
    threads = []

    def fn(x):
        threads.append(threading.current_thread().name)
        return x + 1

    cache.get("g", fn, (jnp.ones(3),))
    assert threads and threads[0].startswith("compile")

    def bad(x):
        raise ValueError("bad program")

    try:
        cache.get("bad", bad, (jnp.ones(3),))
    except ValueError as e:
        assert "bad program" in str(e)
    else:
        raise AssertionError("the compile error did not reach the caller")


def test_max_entries_drops_the_least_recently_used():
    cache = ProgramCache(clock=CompileClock(), max_entries=2)
    for n in (1, 2, 3):
        cache.get("h", jnp.sin, (jnp.ones(n),))
    cache.get("h", jnp.sin, (jnp.ones(3),))  # still there
    cache.get("h", jnp.sin, (jnp.ones(1),))  # evicted: compiles again
    assert len(cache.compile_log) == 4


def test_abstract_and_batch_specs_match_real_batches():
    images = np.zeros((8, 4, 4, 3), np.uint8)
    labels, mask = np.zeros(8, np.int32), np.ones(8, bool)
    specs = batch_specs(8, (4, 4, 3), mask=True)
    assert abstract((images, labels, mask), keep_shardings=False) == specs


def test_training_compiles_one_train_and_one_eval_program_per_structure(tmp_path):
    """The prefetched (abstract) programs are the ones the loop uses: no second compile."""
    config = tiny_config(num_epochs=2)
    trainer = train.Trainer(config, str(tmp_path))
    result = trainer.run()
    names = [name for name, _ in trainer.exp.steps.compile_log]
    structures = 1 + (result["structure"] != {})
    assert names.count("train") == structures and names.count("eval") == structures
    assert names.count("eval_fused") == 1 and names.count("prepare") == 1
    assert 0 <= result["compile_wait_s"] <= result["compile_s_total"] + 1e-6
    assert result["compile_thread_s"]["train"] > 0
    assert result["compile_s_total"] < result["wall_s"]
