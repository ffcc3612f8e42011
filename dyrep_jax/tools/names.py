"""Our parameter paths <-> the reference PyTorch module names, one function per architecture.

A `ConvBN` unit of ours (a conv slot named `conv` + an optional `bn`) maps to
two torch module paths: the conv (a plain `Conv2d`, or a DBB block when grown)
and the BN that follows it. A Dense layer maps to one `Linear`. Everything
else (how tensors are laid out, what a block holds) is generic and lives in
`convert.py` / `export_torch.py`, so adding an architecture means adding one
function here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from dyrep_jax.tools.errors import ToolError


class UnitNames(NamedTuple):
    conv: str  # torch module path of the conv (or of the DBB block grown from it)
    bn: str  # torch module path of the BN that follows the conv


class Naming(NamedTuple):
    unit: Callable[[tuple], UnitNames]  # our ConvBN path -> torch names
    dense: Callable[[tuple], str]  # our Dense path -> torch Linear path
    stem: tuple  # our path of the first ConvBN (it sets the width)
    classifier: tuple  # our path of the Dense producing the logits


def _match(pattern: str, path: tuple):
    return re.fullmatch(pattern, ".".join(path))


def _unknown(kind: str, path: tuple):
    return ToolError(f"no reference name for our {kind} '{'.'.join(path)}'")


def resnet_unit(path: tuple) -> UnitNames:
    """torchvision: conv1/bn1, layer{s}.{i}.conv{j}/bn{j}, layer{s}.{i}.downsample.0/.1."""
    if path == ("conv1",):
        return UnitNames("conv1", "bn1")
    m = _match(r"layer(\d+)_(\d+)\.conv(\d)", path)
    if m:
        stage, index, j = m.groups()
        return UnitNames(f"layer{stage}.{index}.conv{j}", f"layer{stage}.{index}.bn{j}")
    m = _match(r"layer(\d+)_(\d+)\.downsample", path)
    if m:
        where = "layer{}.{}.downsample".format(*m.groups())
        return UnitNames(f"{where}.0", f"{where}.1")
    raise _unknown("conv unit", path)


def resnet_dense(path: tuple) -> str:
    if path == ("fc",):
        return "fc"
    raise _unknown("dense layer", path)


def vgg_unit(path: tuple) -> UnitNames:
    """features.conv{i}.conv / features.conv{i}.bn1."""
    m = _match(r"conv(\d+)", path)
    if m:
        return UnitNames(f"features.conv{m.group(1)}.conv", f"features.conv{m.group(1)}.bn1")
    raise _unknown("conv unit", path)


def vgg_dense(path: tuple) -> str:
    """The 512-wide hidden Linear sits in `features.fc.fc.0`, the classifier in `classifier.linear1`."""
    names = {("fc1",): "features.fc.fc.0", ("fc2",): "classifier.linear1"}
    if path in names:
        return names[path]
    raise _unknown("dense layer", path)


def mobilenet_unit(path: tuple) -> UnitNames:
    """model.0.{0,1} is the stem; block i is model.{i+1} with dw .0/.1 and pw .3/.4."""
    if path == ("stem",):
        return UnitNames("model.0.0", "model.0.1")
    m = _match(r"block(\d+)\.(dw|pw)", path)
    if m:
        index, kind = int(m.group(1)) + 1, m.group(2)
        conv, bn = (0, 1) if kind == "dw" else (3, 4)
        return UnitNames(f"model.{index}.{conv}", f"model.{index}.{bn}")
    raise _unknown("conv unit", path)


RESNET = Naming(resnet_unit, resnet_dense, ("conv1",), ("fc",))
NAMINGS: dict[str, Naming] = {
    "resnet18": RESNET,
    "resnet34": RESNET,
    "resnet50": RESNET,
    "resnet101": RESNET,
    "resnet18_cifar": RESNET,
    "vgg16_cifar": Naming(vgg_unit, vgg_dense, ("conv0",), ("fc2",)),
    "mobilenet_v1": Naming(mobilenet_unit, resnet_dense, ("stem",), ("fc",)),
}
IMPORTABLE = ("resnet18", "resnet34", "resnet50", "resnet101", "vgg16_cifar", "mobilenet_v1")


def naming_for(model_name: str) -> Naming:
    if model_name not in NAMINGS:
        raise ToolError(f"no reference PyTorch naming for model '{model_name}' "
                        f"(known: {', '.join(NAMINGS)})")
    return NAMINGS[model_name]
