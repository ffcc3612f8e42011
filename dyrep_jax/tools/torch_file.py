"""Reading a reference `.pth.tar`: the state_dict (as numpy), the epoch and the DyRep graph.

Accepted wrappers: `{'model': sd, ...}`, `{'state_dict': sd, ...}` or a bare
state_dict; a DataParallel `module.` prefix is stripped from keys and graph
paths. Files are unpickled with `weights_only=True` unless the user trusts
them, because a pickle can run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from dyrep_jax.rep.geometry import BRANCH_NAMES
from dyrep_jax.tools.errors import ToolError, name_list

PREFIX = "module."


class Reference(NamedTuple):
    state: dict  # torch key -> numpy array (float tensors as float32)
    epoch: int
    dbb_graph: dict | None  # torch module path -> branch names, when the file has one


def load_reference(path: str, trust_pickle: bool = False) -> Reference:
    import torch  # optional dependency: only the interop tools need it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError as exc:
        raise ToolError(f"checkpoint file not found: {path}") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input
        hint = "" if trust_pickle else (
            "; if the file holds other Python objects and you trust it, pass --trust-pickle")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ToolError(f"cannot read {path} with torch.load: {first}{hint}") from exc
    return parse_reference(obj, path)


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
