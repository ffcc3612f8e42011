"""Reading a reference `.pth.tar`: the state_dict (as numpy), the epoch and the DyRep graph.

Accepted wrappers: `{'model': sd, ...}`, `{'state_dict': sd, ...}` or a bare
state_dict; a DataParallel `module.` prefix is stripped from keys and graph
paths. Files are unpickled with `weights_only=True` unless the user trusts
them, because a pickle can run code.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from dyrep_jax.rep.geometry import BRANCH_NAMES
from dyrep_jax.tools.errors import ToolError, name_list

PREFIX = "module."
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a legacy (pre-zip) torch.save file


class Reference(NamedTuple):
    state: dict  # torch key -> numpy array (float tensors as float32)
    epoch: int
    dbb_graph: dict | None  # torch module path -> branch names, when the file has one


def load_reference(path: str, trust_pickle: bool = False) -> Reference:
    import torch  # optional dependency: only the interop tools need it

    check_torch_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input
        raise ToolError(load_failure(path, exc, trust_pickle)) from exc
    return parse_reference(obj, path)


def check_torch_file(path: str) -> str:
    """'zip' or 'legacy': the two formats torch.save writes; anything else is refused here.

    Only the file's structure is read (zip directory, pickle opcodes); nothing is unpickled.
    """
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "not found"
        raise ToolError(f"checkpoint file {what}: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/data.pkl") for name in archive.namelist()):
                return "zip"
        raise ToolError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl "
                        "inside)")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == b"PK\x03\x04":
            raise ToolError(f"{path} starts like a PyTorch checkpoint (zip) but cannot be read "
                            "as one: truncated or damaged? Copy it again")
        if first_pickled_long(f) == LEGACY_MAGIC:
            return "legacy"
    raise ToolError(f"{path} is not a PyTorch checkpoint: neither a zip archive as torch.save "
                    "writes nor a legacy torch file")


def first_pickled_long(f):
    """The long integer that opens a legacy torch file, read from opcodes (never executed)."""
    try:
        for opcode, arg, _ in pickletools.genops(f):
            if opcode.name in ("LONG1", "LONG4", "LONG"):
                return arg
            if opcode.name != "PROTO":
                return None
    except Exception:  # noqa: BLE001 - not a pickle at all
        return None
    return None


def load_failure(path: str, exc: Exception, trust_pickle: bool) -> str:
    """One line for a torch.load failure; --trust-pickle is offered only for a safety refusal."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if not trust_pickle and "Weights only load failed" in first:
        detail = next((line for line in lines if "WeightsUnpickler error" in line), first)
        detail = detail.split(". Please")[0][:300]
        return (f"{path} holds Python objects other than tensors, which are not unpickled "
                f"by default ({detail}); if you trust the file, pass --trust-pickle")
    return f"cannot read {path} with torch.load: {first[:300]}"


def parse_reference(obj, where: str = "checkpoint") -> Reference:
    """Unwrap a loaded checkpoint object (see module docstring)."""
    if not isinstance(obj, Mapping):
        raise ToolError(f"{where}: expected a dict, got {type(obj).__name__}")
    epoch, graph = 0, None
    if isinstance(obj.get("model"), Mapping):
        state = obj["model"]
    elif isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
    elif obj and all(_is_tensor(v) for v in obj.values()):
        state = obj
    else:
        raise ToolError(f"{where}: no state_dict found: expected a 'model' or 'state_dict' "
                        f"entry or a bare state_dict; top-level keys: {name_list(map(str, obj))}")
    if state is not obj:
        epoch = _as_int(obj.get("epoch", 0))
        dyrep = obj.get("dyrep")
        if isinstance(dyrep, Mapping) and dyrep.get("dbb_graph") is not None:
            graph = parse_graph(dyrep["dbb_graph"], where)
    return Reference(tensors_as_numpy(strip_prefix(state, where)), epoch, graph)


def _is_tensor(value) -> bool:
    return hasattr(value, "detach") and hasattr(value, "shape")


def _as_int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def strip_prefix(state: Mapping, where: str) -> dict:
    """Keys without DataParallel's `module.`; refuses two keys that collapse into one."""
    out = {}
    for key, value in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in out:
            raise ToolError(f"{where}: keys '{name}' and '{PREFIX}{name}' both present")
        out[name] = value
    return out


def tensors_as_numpy(state: dict) -> dict:
    out, bad = {}, []
    for key, value in state.items():
        if not _is_tensor(value):
            bad.append(key)
            continue
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        out[key] = np.asarray(tensor.numpy())
    if bad:
        raise ToolError(f"state_dict entries that are not tensors: {name_list(bad)}")
    return out


def parse_graph(graph, where: str) -> dict:
    """`[(path, [0/1 x 7]), ...]` (or a dict) -> {path: branch names in reference order}."""
    items = graph.items() if isinstance(graph, Mapping) else graph
    out = {}
    for entry in items:
        try:
            path, bits = entry
            bits = [int(b) for b in bits]
        except (TypeError, ValueError) as exc:
            raise ToolError(f"{where}: malformed dbb_graph entry {entry!r}") from exc
        if len(bits) != len(BRANCH_NAMES) or any(b not in (0, 1) for b in bits):
            raise ToolError(f"{where}: dbb_graph entry for '{path}' must be 7 zeros/ones in the "
                            f"order {list(BRANCH_NAMES)}, got {bits}")
        path = path[len(PREFIX):] if path.startswith(PREFIX) else path
        out[path] = tuple(b for b, on in zip(BRANCH_NAMES, bits, strict=True) if on)
    return out
