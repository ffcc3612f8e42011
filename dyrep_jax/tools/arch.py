"""The architecture behind a checkpoint, as one dict, and the model built from it.

An arch dict holds the fields of `checkpoint.arch_record` (`model`,
`num_classes`, `width`, `image_shape`, `with_bn_after_3x3`: False for the
static DBB baseline, ...). It comes from an `arch.json` when one exists;
otherwise it is inferred from the parameters:

- num_classes: the output width of the classifier Dense (the one Dense whose
  output follows `num_classes` in the model);
- width: output channels of the stem conv (the first conv unit reading the
  image) divided by the same at width 1.0;
- with_bn_after_3x3: False when some conv unit has no BN after it;
- image_shape: the model's default (32x32x3 CIFAR, 224x224x3 ImageNet).

The inferred arch is then verified against every layer (`fit.check_fits`),
so a rule that guesses wrong fails with the layer that does not fit.
"""

from __future__ import annotations

from dyrep_jax import checkpoint as ckpt
from dyrep_jax.checkpoint import ARCH_FILE
from dyrep_jax.models import create_model, default_input_shape
from dyrep_jax.models.registry import MODEL_NAMES
from dyrep_jax.rep.tree import get_at
from dyrep_jax.tools.errors import ToolError
from dyrep_jax.tools.fit import abstract_variables
from dyrep_jax.tools.layout import layers_of, slot_out_channels


def read_arch_file(directory: str) -> dict | None:
    """DIR/arch.json (schema: `checkpoint.arch_record`), or None if there is none."""
    try:
        return ckpt.read_arch(directory)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc


def write_arch_file(directory: str, arch: dict) -> str:
    return ckpt.write_arch(directory, arch)


def check_model_name(name) -> str:
    if name not in MODEL_NAMES:
        raise ToolError(f"unknown model '{name}' (known: {', '.join(MODEL_NAMES)})")
    return name


def image_shape_of(arch: dict) -> tuple:
    return tuple(arch.get("image_shape") or default_input_shape(arch["model"]))


def build_model(arch: dict, deploy: bool = False):
    """The flax module for `arch` (float32 compute), training or deploy form."""
    return create_model(check_model_name(arch["model"]), num_classes=arch.get("num_classes"),
                        width=float(arch.get("width", 1.0)),
                        with_bn_after_3x3=bool(arch.get("with_bn_after_3x3", True)),
                        deploy=deploy)


def reference_layers(model_name: str):
    """(params at width 1.0 with 1 class, stem unit path, classifier path), shapes only."""
    image_shape = default_input_shape(check_model_name(model_name))
    params = abstract_variables(create_model(model_name, num_classes=1), image_shape)["params"]
    units = [layer.path for layer in layers_of(params) if layer.kind == "unit"
             and get_at(params, (*layer.path, "conv"))["kernel"].shape[2] == image_shape[-1]]
    heads = [layer.path for layer in layers_of(params) if layer.kind == "dense"
             and get_at(params, layer.path)["kernel"].shape[-1] == 1]
    if not units or len(heads) != 1:
        raise ToolError(f"cannot tell the stem and classifier of '{model_name}' apart; write an "
                        f"{ARCH_FILE} next to the checkpoint")
    return params, units[0], heads[0]


def infer_arch(model_name: str, params) -> dict:
    """Arch of a training checkpoint without arch.json (rules in the module docstring)."""
    ref, stem, head = reference_layers(model_name)
    stem_slot = get_at(params, (*stem, "conv"))
    head_dense = get_at(params, head)
    if stem_slot is None or head_dense is None:
        raise ToolError(f"checkpoint has no '{'.'.join(stem)}' or '{'.'.join(head)}' layer; is "
                        f"it really a '{model_name}'?")
    width = slot_out_channels(stem_slot) / slot_out_channels(get_at(ref, (*stem, "conv")))
    with_bn = all(layer.has_bn for layer in layers_of(params) if layer.kind == "unit")
    return {"model": model_name, "num_classes": int(head_dense["kernel"].shape[-1]),
            "width": width, "with_bn_after_3x3": with_bn,
            "image_shape": list(default_input_shape(model_name))}


def with_bn_layout(arch: dict, params) -> dict:
    """`arch` plus `with_bn_after_3x3` read off the params when the arch does not say."""
    if "with_bn_after_3x3" in arch:
        return arch
    units = [layer for layer in layers_of(params) if layer.kind == "unit"]
    return {**arch, "with_bn_after_3x3": all(layer.has_bn for layer in units)}
