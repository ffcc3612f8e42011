"""A local Google Cloud Storage emulator, so tests use real `gs://` paths offline.

`gcp-storage-emulator` (pure Python, in-memory) runs as a subprocess on a free
port with one bucket. `pointed_at(url)` then aims every client we use at it:

- etils.epath -> fsspec -> gcsfs: `STORAGE_EMULATOR_HOST`, anonymous token, no
  listings cache, and gcsfs's zonal-bucket probe (a gRPC call the emulator does
  not serve) off via `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`;
- tensorstore (orbax's array writer): `TENSORSTORE_GCS_HTTP_URL` plus a dummy
  `GOOGLE_AUTH_TOKEN_FOR_TESTING`, so it never looks for real credentials;
- google-cloud-storage (tensorboardX's own gs:// writer): `STORAGE_EMULATOR_HOST`.

Fixtures: `gcs_emulator` (one per test session) and `gcs_dir` (a fresh
`gs://` folder per test). Both skip when the emulator or gcsfs is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

BUCKET = "dyrep-test"
SKIP_REASON = "needs gcp-storage-emulator and gcsfs (pip install -r requirements-dev.txt)"

# Runs in the child: serve until the parent (the test process) is gone, so a
# killed test run leaves no emulator behind. The emulator lacks GCS's
# `moveTo` (gcsfs's rename), and gcsfs retries the 501 for ~30 s per object
# before copying, so a move route (copy, then delete) is added first.
_SERVE = """
import os, sys, time
from http import HTTPStatus
from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

def move(request, response, storage, *args, **kwargs):
    p = request.params
    try:
        dest = objects._copy(request.base_url, storage, p["bucket_name"], p["object_id"],
                             p["bucket_name"], p["dest_object_id"])
    except objects.NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    objects._delete(storage, p["bucket_name"], p["object_id"])
    response.json(dest)

MOVE = (r"^/storage/v1/b/(?P<bucket_name>[-.\\w]+)/o/(?P<object_id>.*[^/]+)"
        r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
plain_download = objects.download

def download(request, response, storage, *args, **kwargs):
    # Real GCS sends the object's generation with its bytes; tensorstore's gcs
    # driver (orbax's OCDBT manifest) fails with "Malformed StorageGeneration" without it.
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:
        pass
    plain_download(request, response, storage, *args, **kwargs)

objects.download = download  # objects.get calls it for ?alt=media
emulator.HANDLERS = ((MOVE, {"POST": move}),
                     *((regex, {m: download if f is plain_download else f
                                for m, f in routes.items()})
                       for regex, routes in emulator.HANDLERS))
parent = os.getppid()
server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
while os.getppid() == parent:
    time.sleep(0.5)
server.stop()
"""


def emulator_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("gcp_storage_emulator", "gcsfs"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GcsEmulator:
    """A running emulator: its base URL, its bucket and its process."""

    url: str
    bucket: str
    process: subprocess.Popen

    def path(self, *parts: str):
        """`gs://BUCKET/parts...` as an `etils.epath.Path`."""
        from etils import epath

        return epath.Path(f"gs://{self.bucket}").joinpath(*parts)

    def object_names(self, prefix: str = "") -> list[str]:
        """Object names under `prefix`, asked of the server's JSON API directly
        (not through gcsfs), to prove the data really is in the emulator."""
        query = urllib.parse.urlencode({"prefix": prefix})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}") as r:
            return sorted(item["name"] for item in json.load(r).get("items", []))

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def start_emulator(bucket: str = BUCKET, log_path: str = os.devnull, tries: int = 3) -> GcsEmulator:
    """Start the emulator on a free port; retries with another port if one was taken."""
    for _ in range(tries):
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(port), bucket],
                                    stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1).read()
                return GcsEmulator(url, bucket, proc)
            except OSError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"GCS emulator did not start; see {log_path}")


def _reset_fsspec_caches():
    """Forget gcsfs instances made before (or during) the emulator's life."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    type(backend.fsspec_backend)._get_filesystem.cache_clear()


@contextlib.contextmanager
def pointed_at(url: str):
    """Aim epath/gcsfs, tensorstore and google-cloud-storage at `url`; undo on exit.

    Sets environment variables too, so subprocesses started meanwhile (a
    `python -m dyrep_jax.main` run) use the emulator as well.
    """
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-needs-no-token",
        # The emulator serves one request at a time.
        "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "4",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        # For child processes (fsspec reads this at import): anonymous, no listing cache.
        "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
    }
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    import fsspec.config
    import gcsfs

    saved_conf = {p: fsspec.config.conf.get(p) for p in ("gs", "gcs")}
    for p in ("gs", "gcs"):
        fsspec.config.conf[p] = {"token": "anon", "use_listings_cache": False}
    # gcsfs picks its zonal-aware class at import time; use the plain one even
    # if gcsfs was imported before the variable above was set.
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
    _reset_fsspec_caches()
    try:
        yield
    finally:
        _reset_fsspec_caches()
        for p, v in saved_conf.items():
            if v is None:
                fsspec.config.conf.pop(p, None)
            else:
                fsspec.config.conf[p] = v
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """One emulator for the session, with every client pointed at it."""
    if not emulator_available():
        pytest.skip(SKIP_REASON)
    log_path = str(tmp_path_factory.mktemp("gcs_emulator") / "emulator.log")
    emulator = start_emulator(log_path=log_path)
    try:
        with pointed_at(emulator.url):
            yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs_dir(gcs_emulator, request):
    """A fresh, empty `gs://` folder for one test."""
    name = request.node.name.replace("[", "-").replace("]", "")[:40]
    return gcs_emulator.path(f"{name}-{uuid.uuid4().hex[:8]}")
