"""File operations that work the same on a local disk and on `gs://` (any etils.epath path).

Cloud object stores differ from a disk in ways that bite silently:
- no append: gcsfs opens mode 'a' as a plain overwrite (with only a warning), so
  `append_line` reads the object and writes it back whole;
- folders are virtual: `mkdir` makes nothing and an empty folder does not
  `exists()`; check for files, not folders;
- renaming a folder copies then deletes every object (not atomic);
- gcsfs caches listings forever by default, so files written by another client
  (tensorstore, another host) can be missed or read short: `fresh_listings()`
  turns that cache off;
- tensorboardX's own gs:// writer needs google-cloud-storage and re-uploads in
  `__del__` (an exit can hang two minutes when the bucket is unreachable):
  `route_tensorboardx_through_epath()` sends event files through epath instead.
"""

from __future__ import annotations

import os

from etils import epath


def is_local(path) -> bool:
    """A path on this machine's filesystem (no `scheme://`)."""
    return "://" not in os.fspath(path)


def as_path(path) -> epath.Path:
    """`path` as an epath.Path; local paths made absolute, `gs://...` kept as is."""
    if is_local(path):
        return epath.Path(os.path.abspath(os.fspath(path)))
    return epath.Path(path)


def append_line(path, line: str) -> None:
    """Add `line` and a newline at the end of the file `path`, creating it if needed.

    On cloud paths this rewrites the whole object: fine for logs of a few
    thousand lines written by one process, not for concurrent writers.
    """
    path = epath.Path(path)
    text = line.rstrip("\n") + "\n"
    if is_local(path):
        with open(os.fspath(path), "a") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    path.write_text(old + text)


def move_aside(path, suffix: str) -> epath.Path:
    """Rename `path` (file or folder) to `path` + `suffix` (+ `.N` if taken); returns it.

    For keeping a broken checkpoint step for inspection instead of deleting it.
    """
    path = epath.Path(path)
    target = path.with_name(path.name + suffix)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{suffix}.{n}")
        n += 1
    path.rename(target)
    return target


def fresh_listings() -> None:
    """Turn off gcsfs's listing cache (unless configured already).

    Call once before the first `gs://` access: filesystems made earlier keep
    their settings. Without it, a file that tensorstore or another host wrote
    after a listing stays invisible, or is read only up to its old size.
    """
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


class EpathEventFile:
    """A tensorboardX record sink on any epath path: keeps the bytes, rewrites on flush."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self.data = bytearray()
        self.flushed = 0

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        if len(self.data) != self.flushed:
            self.path.write_bytes(bytes(self.data))
            self.flushed = len(self.data)

    def close(self) -> None:
        self.flush()


class EpathEventFiles:
    """tensorboardX writer factory (see `record_writer.register_writer_factory`)."""

    def open(self, path: str) -> EpathEventFile:
        return EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def route_tensorboardx_through_epath(schemes: tuple[str, ...] = ("gs",)) -> None:
    """Make tensorboardX write `scheme://` event files through etils.epath (gcsfs for gs)."""
    from tensorboardX import record_writer

    for scheme in schemes:
        record_writer.register_writer_factory(scheme, EpathEventFiles())
