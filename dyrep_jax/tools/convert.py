"""Reference state_dict -> our variables, generic over architectures.

The model's (plain) template says which conv units, BNs and Dense layers must
exist; `names.py` says what they are called in torch. The *structure* of each
conv comes from the tensors: `P.weight` is a plain conv, `P.dbb_*` a block,
read recursively (a block's `dbb_kxk.conv` / `dbb_1x1_kxk.conv2` may itself
be a block). Every key is accounted for: tensors the template asks for but the
file lacks are *missing*, tensors nobody read are *unexpected*, and either
stops the import so no weight is silently dropped.

Layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out); BN weight/bias ->
scale/bias, running_mean/var -> mean/var (num_batches_tracked is dropped).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dyrep_jax.rep.branches import BRANCH_NAMES, TORCH_NAMES
from dyrep_jax.rep.tree import set_at
from dyrep_jax.tools.errors import ToolError, name_list
from dyrep_jax.tools.layout import layers_of

TORCH_BRANCH = TORCH_NAMES  # our branch kind -> its module name in a DiverseBranchBlock


class ConversionError(ToolError):
    """Keys missing from or left over in the file; both lists name torch keys."""

    def __init__(self, missing, unexpected, hint: str = ""):
        self.missing, self.unexpected = list(missing), list(unexpected)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {name_list(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}), which would be dropped: "
                         f"{name_list(self.unexpected)}")
        super().__init__("; ".join(parts) + (f". {hint}" if hint else ""))


class KeyReader:
    """Hands out tensors by key and remembers which were read and which were absent."""

    def __init__(self, state: dict):
        self.state = state
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.modules = {key.rsplit(".", 1)[0] for key in state}

    def has_under(self, module: str) -> bool:
        """Whether any key lives inside the torch module path `module`."""
        return any(m == module or m.startswith(module + ".") for m in self.modules)

    def take(self, key: str, optional: bool = False):
        if key in self.state:
            self.used.add(key)
            return self.state[key]
        if not optional:
            self.missing.append(key)
        return None

    def unexpected(self) -> list[str]:
        return [key for key in self.state if key not in self.used]


def take_conv(reader: KeyReader, key: str):
    """A conv weight, OIHW -> HWIO (None when missing)."""
    weight = reader.take(key)
    if weight is None:
        return None
    if weight.ndim != 4:
        raise ToolError(f"{key}: a conv weight must be 4-d (out, in/groups, kh, kw), got shape "
                        f"{weight.shape}")
    return np.transpose(weight, (2, 3, 1, 0))


def read_bn(reader: KeyReader, module: str):
    """(params, stats) of a BatchNorm2d/1d at `module`."""
    reader.take(f"{module}.num_batches_tracked", optional=True)
    params = {"scale": reader.take(f"{module}.weight"), "bias": reader.take(f"{module}.bias")}
    stats = {"mean": reader.take(f"{module}.running_mean"),
             "var": reader.take(f"{module}.running_var")}
    return params, stats


def read_dense(reader: KeyReader, module: str) -> dict:
    """A Linear: weight (out, in) -> kernel (in, out)."""
    weight = reader.take(f"{module}.weight")
    if weight is not None and weight.ndim != 2:
        raise ToolError(f"{module}.weight: a linear weight must be 2-d (out, in), got shape "
                        f"{weight.shape}")
    return {"kernel": None if weight is None else weight.T, "bias": reader.take(f"{module}.bias")}


def read_slot(reader: KeyReader, module: str, blocks: dict):
    """(params, stats) of the conv slot at `module`; records each block in `blocks`."""
    if any(reader.has_under(f"{module}.{name}") for name in TORCH_BRANCH.values()):
        return read_block(reader, module, blocks)
    params = {"kernel": take_conv(reader, f"{module}.weight")}
    bias = reader.take(f"{module}.bias", optional=True)
    if bias is not None:
        params["bias"] = bias
    return params, {}


def read_block(reader: KeyReader, module: str, blocks: dict):
    params, stats = {}, {}
    for branch in BRANCH_NAMES:
        where = f"{module}.{TORCH_BRANCH[branch]}"
        if branch == "kxk" or reader.has_under(where):  # kxk is required
            read = BRANCH_READERS.get(branch, read_conv_bn)
            params[branch], stats[branch] = read(reader, where, blocks)
    blocks[module] = tuple(params)
    return params, stats


def read_kxk(reader, where, blocks):
    conv_p, conv_s = read_slot(reader, f"{where}.conv", blocks)
    bn_p, bn_s = read_bn(reader, f"{where}.bn")
    stats = {"bn": bn_s, **({"conv": conv_s} if conv_s else {})}
    return {"conv": conv_p, "bn": bn_p}, stats


def read_conv_bn(reader, where, blocks):
    """1x1, 1xk and kx1: one bias-free conv, then a BN."""
    bn_p, bn_s = read_bn(reader, f"{where}.bn")
    kernel = take_conv(reader, f"{where}.conv.weight")
    return {"conv": {"kernel": kernel}, "bn": bn_p}, {"bn": bn_s}


def read_1x1_kxk(reader, where, blocks):
    """conv1 (1x1) -> bn1 (BN-and-pad, tensors under `bn1.bn`) -> conv2 (a slot) -> bn2."""
    bn1_p, bn1_s = read_bn(reader, f"{where}.bn1.bn")
    conv2_p, conv2_s = read_slot(reader, f"{where}.conv2", blocks)
    bn2_p, bn2_s = read_bn(reader, f"{where}.bn2")
    params = {"conv1": {"kernel": take_conv(reader, f"{where}.conv1.weight")},
              "bn1": bn1_p, "conv2": conv2_p, "bn2": bn2_p}
    stats = {"bn1": bn1_s, "bn2": bn2_s, **({"conv2": conv2_s} if conv2_s else {})}
    return params, stats


def read_1x1_avg(reader, where, blocks):
    """[conv 1x1 -> BN-and-pad (`bn.bn`)] -> avg pool -> avgbn; depthwise has no conv."""
    avg_p, avg_s = read_bn(reader, f"{where}.avgbn")
    if not reader.has_under(f"{where}.conv"):
        return {"avgbn": avg_p}, {"avgbn": avg_s}
    bn_p, bn_s = read_bn(reader, f"{where}.bn.bn")
    kernel = take_conv(reader, f"{where}.conv.weight")
    return ({"conv": {"kernel": kernel}, "bn": bn_p, "avgbn": avg_p},
            {"bn": bn_s, "avgbn": avg_s})


def read_id(reader, where, blocks):
    bn_p, bn_s = read_bn(reader, where)
    return {"bn": bn_p}, {"bn": bn_s}


# How each kind's tensors are named inside its torch module; a kind not listed is read as
# one bias-free conv then a BN (`conv.weight`, `bn.*`).
BRANCH_READERS = {"kxk": read_kxk, "1x1_kxk": read_1x1_kxk, "1x1_avg": read_1x1_avg,
                  "id": read_id}


class Converted(NamedTuple):
    variables: dict  # {'params', 'batch_stats'}
    sources: dict  # our layer path -> UnitNames (units) or torch module path (dense)
    blocks: dict  # torch module path of each block found -> its branch names


def convert_state(state: dict, naming, template_params, hint_for=None) -> Converted:
    """Our variables for `state`, laid out like `template_params` (plain) but grown as the
    tensors say. Raises ConversionError naming every missing or unexpected key.

    `hint_for(missing, unexpected)` may return a sentence appended to that error.
    """
    reader = KeyReader(state)
    params, stats, sources, blocks = {}, {}, {}, {}
    for layer in layers_of(template_params):
        if layer.kind == "unit":
            names = naming.unit(layer.path)
            sources[layer.path] = names
            slot_p, slot_s = read_slot(reader, names.conv, blocks)
            node_p, node_s = {"conv": slot_p}, ({"conv": slot_s} if slot_s else {})
            if layer.has_bn:
                node_p["bn"], node_s["bn"] = read_bn(reader, names.bn)
        else:
            module = naming.dense(layer.path)
            sources[layer.path] = module
            node_p, node_s = read_dense(reader, module), {}
        params = set_at(params, layer.path, node_p)
        stats = set_at(stats, layer.path, node_s)
    unexpected = reader.unexpected()
    if reader.missing or unexpected:
        hint = hint_for(reader.missing, unexpected) if hint_for else ""
        raise ConversionError(reader.missing, unexpected, hint or "")
    return Converted({"params": params, "batch_stats": stats}, sources, blocks)
