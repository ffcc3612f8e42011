"""Ahead-of-time compiled programs: a cache keyed by input structure, compiles in threads.

`ProgramCache.prefetch` starts `jax.jit(fn).lower(*args).compile()` in a thread pool and
returns at once, so the next structure's train and eval programs compile side by side
while the caller goes on (XLA releases the GIL while it compiles); `get` waits for (or
starts) the program. Programs are keyed by name and the abstract inputs (tree structure,
shapes, dtypes), so a structure seen before compiles never.

Compile seconds are wall seconds: `CompileClock` counts the time during which at least
one compile runs in this process, so two overlapping compiles count once (not the sum of
thread seconds). `wait_seconds` is the part the caller spent blocked on compiles.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import jax

log = logging.getLogger("dyrep_jax")


class CompileClock:
    """Wall seconds in which at least one compile was running (overlaps count once)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running, self._since, self._total = 0, 0.0, 0.0
        self.wait_seconds = 0.0  # callers' time blocked on compiles (see ProgramCache.get)
        self.log = []  # (kind, thread seconds) of every compile counted here

    def start(self) -> None:
        with self._lock:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1

    def stop(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._total += time.perf_counter() - self._since

    def add_compile(self, name, seconds: float) -> None:
        kind = name[0] if isinstance(name, tuple) else name
        with self._lock:
            self.log.append((str(kind), seconds))

    def mark(self) -> tuple:
        """A snapshot for `since`."""
        with self._lock:
            return len(self.log), self.wait_seconds, self._total + (
                time.perf_counter() - self._since if self._running else 0.0)

    def since(self, mark: tuple) -> dict:
        """Compile figures since `mark`: wall seconds with a compile running
        (`compile_s_total`), seconds callers waited (`compile_wait_s`), and the thread
        seconds of each kind of program (`compile_thread_s`, overlaps counted twice)."""
        count, waited, total = mark
        by_kind = {}
        with self._lock:
            for kind, seconds in self.log[count:]:
                by_kind[kind] = by_kind.get(kind, 0.0) + seconds
            wait = self.wait_seconds - waited
        return {"compile_s_total": self.seconds - total, "compile_wait_s": wait,
                "compile_thread_s": {k: round(v, 2) for k, v in sorted(by_kind.items())}}

    def add_wait(self, seconds: float) -> None:
        with self._lock:
            self.wait_seconds += seconds

    @property
    def seconds(self) -> float:
        """Seconds so far, including the running part of compiles still in progress."""
        with self._lock:
            running = time.perf_counter() - self._since if self._running else 0.0
            return self._total + running


PROCESS_CLOCK = CompileClock()  # every ProgramCache of this process counts here by default


def abstract(tree, keep_shardings: bool = True):
    """Shapes, dtypes (and shardings) of a tree of arrays: what lowering needs."""

    def one(a):
        if isinstance(a, jax.ShapeDtypeStruct) and (keep_shardings or a.sharding is None):
            return a
        # an uncommitted array (e.g. a key made by an eager op) goes where the program needs
        # it, as with jax.jit; only committed placements are part of the program
        committed = getattr(a, "committed", True)
        sharding = getattr(a, "sharding", None) if keep_shardings and committed else None
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding,
                                    weak_type=bool(getattr(a, "weak_type", False)))

    return jax.tree_util.tree_map(one, tree)


def structure_key(name, args, with_shardings: bool) -> tuple:
    """Cache key: name, tree structure, and (shape, dtype[, sharding]) of every leaf.

    Shardings matter only where the program takes them from its inputs (no in_shardings).
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (name, treedef, tuple((tuple(a.shape), str(a.dtype),
                                  getattr(a, "sharding", None) if with_shardings else None)
                                 for a in leaves))


class ProgramCache:
    """Compiled programs keyed by (name, abstract inputs); compiles run in a thread pool."""

    def __init__(self, workers: int = 2, clock: CompileClock | None = None,
                 max_entries: int = 0):
        self._futures: OrderedDict = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compile")
        self._lock = threading.Lock()
        self.clock = PROCESS_CLOCK if clock is None else clock
        self.max_entries = max_entries  # 0 = unbounded; else drop the least recently used
        self.compile_log = []  # (name, seconds of that one compile, in its thread)

    @property
    def compile_seconds(self) -> float:
        """Wall seconds in which some compile of this process ran (see `CompileClock`)."""
        return self.clock.seconds

    @property
    def wait_seconds(self) -> float:
        """Seconds callers of this process spent blocked in `get` on unfinished compiles."""
        return self.clock.wait_seconds

    def prefetch(self, name, fn, args, *, in_shardings=None, out_shardings=None,
                 donate=()) -> Future:
        """Start compiling `fn` for `args` (arrays or ShapeDtypeStructs) unless known."""
        args = abstract(args, keep_shardings=in_shardings is None)
        key = structure_key(name, args, with_shardings=in_shardings is None)
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                                 donate_argnums=donate)
                future = self._pool.submit(self._compile, name, jitted, args)
                self._futures[key] = future
                self._evict()
            self._futures.move_to_end(key)
        return future

    def get(self, name, fn, args, **jit_kwargs):
        """The compiled program for `args`: compiled before, being compiled, or now."""
        future = self.prefetch(name, fn, args, **jit_kwargs)
        if not future.done():
            start = time.perf_counter()
            future.result()
            self.clock.add_wait(time.perf_counter() - start)
        return future.result()

    def drop(self, name) -> None:
        """Forget programs of `name` (e.g. old structures that will not come back)."""
        with self._lock:
            for key in [k for k in self._futures if k[0] == name]:
                del self._futures[key]

    def _evict(self) -> None:
        while self.max_entries and len(self._futures) > self.max_entries:
            self._futures.popitem(last=False)

    def _compile(self, name, jitted, args):
        self.clock.start()
        start = time.perf_counter()
        try:
            compiled = jitted.lower(*args).compile()
        finally:
            self.clock.stop()
        seconds = time.perf_counter() - start
        self.compile_log.append((name, seconds))
        self.clock.add_compile(name, seconds)
        log.info("compiled %s program for a new structure in %.1fs", name, seconds)
        return compiled
