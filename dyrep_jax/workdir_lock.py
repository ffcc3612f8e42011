"""One run per workdir: an exclusive lock file held for the run's lifetime.

Two runs writing one workdir corrupt each other's checkpoints and double every
record, so a run takes DIR/workdir.lock first. The file is created atomically
and holds who owns it: host, pid, the pid's start time, run id, start time. A
second process fails at once with a `WorkdirLockedError` naming the holder. A
lock left behind by a dead process on this host (its pid gone, or reused by a
newer process) is taken over with a warning. A holder on another host cannot
be checked from here: the error says to delete the file if that run is gone.

Multi-host: only the primary process (jax.process_index() == 0) takes the
lock; every process gets the same run id (`WorkdirLock.run_id`), for the
checkpoint metadata.

Cloud workdirs (gs://...): file operations go through `etils.epath`, which has
no create-if-absent, so there the lock is checked, written, then read back: it
guards against a second run started by mistake, not against two starts within
the same second. On local paths creation is `os.open(O_CREAT | O_EXCL)`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from etils import epath

from dyrep_jax.errors import WorkdirError

LOCK_FILE = "workdir.lock"
log = logging.getLogger("dyrep_jax")


class WorkdirLockedError(WorkdirError):
    """The workdir is locked by another run; the message names it and what to do."""


def new_run_id() -> str:
    """A readable unique id: UTC start time plus 8 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` (Linux /proc), to tell a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether `pid` runs on this host and is the same process that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    current = process_start_ticks(pid)
    return start_ticks is None or current is None or current == start_ticks


def is_local(path) -> bool:
    """A path of this machine's filesystem (no `scheme://`), where O_EXCL is available."""
    return "://" not in os.fspath(path)


def describe(holder: dict) -> str:
    return (f"run {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')})")


class WorkdirLock:
    """Context manager holding DIR/workdir.lock; `run_id` is this run's id on every process."""

    def __init__(self, workdir, run_id: str | None = None, primary: bool = True):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.run_id = run_id or new_run_id()
        self.primary = primary
        self.held = False

    def info(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start_ticks(pid),
                "run_id": self.run_id,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def acquire(self) -> WorkdirLock:
        if not self.primary or self.held:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._take()
        except OSError as exc:  # read-only, a file in the path, no space
            raise WorkdirError(f"cannot write the workdir {self.path.parent} ({exc}); use a "
                               "writable --workdir") from exc

    def _take(self) -> WorkdirLock:
        for _ in range(3):  # a stale lock taken over, then a race lost, then give up
            if self._create():
                self.held = True
                return self
            holder = self._read_holder()
            if holder is None:
                continue  # released between our attempt and the read: try again
            if not self._is_stale(holder):
                raise WorkdirLockedError(self._locked_message(holder))
            log.warning("workdir lock %s was left by %s, which is no longer running; taking "
                        "it over", self.path, describe(holder))
            self._remove_if_same(holder)
        raise WorkdirLockedError(f"could not take the workdir lock {self.path}: other runs keep "
                                 "taking it; is another run starting on this workdir?")

    def release(self) -> None:
        """Remove the lock file if it is still ours (never another run's)."""
        if self.held:
            self._remove_if_same({"run_id": self.run_id, "pid": os.getpid()})
            self.held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _create(self) -> bool:
        """Create the lock file holding `info()`; False when it exists already."""
        data = json.dumps(self.info(), indent=1).encode()
        if is_local(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.path.exists():  # cloud path: best effort (module docstring)
            return False
        self.path.write_bytes(data)
        return self._read_holder() == json.loads(data)

    def _read_holder(self) -> dict | None:
        """The lock file's content; None if it is gone; {} if unreadable (being written)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # another host (or a file being written): cannot tell, assume alive
        return not pid_alive(holder["pid"], holder.get("pid_start"))

    def _remove_if_same(self, holder: dict) -> None:
        current = self._read_holder()
        if current and all(current.get(k) == holder.get(k) for k in ("run_id", "pid")):
            self.path.unlink(missing_ok=True)

    def _locked_message(self, holder: dict) -> str:
        where = "this host" if holder.get("host") == socket.gethostname() else "another host"
        return (f"workdir {self.path.parent} is in use by {describe(holder)} on {where}; "
                f"wait for it to finish or use another --workdir (if that run is gone, "
                f"delete {self.path})")


def lock_workdir(workdir, run_id: str | None = None) -> WorkdirLock:
    """The lock for a run on `workdir`, taken by the primary process only; use as `with`.

    On multi-host runs every process must call it; the run id is made on the
    primary and shared with the others so checkpoint metadata agrees.
    """
    import jax

    if jax.process_count() > 1:
        run_id = shared_run_id(run_id)
    return WorkdirLock(workdir, run_id, primary=jax.process_index() == 0)


def shared_run_id(run_id: str | None) -> str:
    """The primary's run id on every process (a broadcast of its bytes)."""
    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.zeros(64, np.uint8)
    encoded = (run_id or new_run_id()).encode()[:64]
    mine[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(mine))
    return bytes(shared.astype(np.uint8)).rstrip(b"\0").decode()
