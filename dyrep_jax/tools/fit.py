"""Does a variables tree fit a model? Checked by shapes only (no compute), layer by layer.

A wrong width, class count or a block whose tensors disagree would otherwise
surface as an XLA shape error deep inside `apply`; here each problem names
the layer (in torch naming when importing) and the shapes involved.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dyrep_jax.models.variables import image_spec
from dyrep_jax.rep.apply import apply_slot
from dyrep_jax.rep.fuse import fuse_slot
from dyrep_jax.rep.introspect import slot_geometries
from dyrep_jax.rep.tree import dotted, get_at, to_plain_dict
from dyrep_jax.tools.errors import ToolError
from dyrep_jax.tools.layout import layers_of


def abstract_variables(model, image_shape) -> dict:
    """The model's freshly initialized variables as shapes only (plain slots)."""
    init = partial(model.init, train=False)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a raw PRNG key, never materialized
    variables = to_plain_dict(jax.eval_shape(init, key, image_spec(image_shape)))
    variables.setdefault("batch_stats", {})
    return variables


def our_names(path, part):
    """Default layer naming for messages: our own dotted paths."""
    return dotted((*path, part))


def check_fits(model, variables, image_shape, name_of=our_names, what: str = "checkpoint"):
    """Raise ToolError listing every layer of `variables` that does not fit `model`."""
    template = abstract_variables(model, image_shape)
    geometries = slot_geometries(model, template, image_spec(image_shape))
    params, stats = variables["params"], variables.get("batch_stats", {})
    problems = []
    wanted = layers_of(template["params"])
    for layer in wanted:
        have, want = get_at(params, layer.path), get_at(template["params"], layer.path)
        if have is None:
            problems.append(f"{name_of(layer.path, None)}: missing")
        elif layer.kind == "dense":
            problems += leaf_problems(have, want, ("kernel", "bias"), name_of(layer.path, None))
        else:
            slot_path = (*layer.path, "conv")
            problems += slot_problems(have.get("conv"), get_at(stats, slot_path, {}), want["conv"],
                                      geometries[slot_path], name_of(layer.path, "conv"))
            if layer.has_bn:
                bn_name = name_of(layer.path, "bn")
                problems += leaf_problems(have.get("bn", {}), want["bn"], ("scale", "bias"), bn_name)
                problems += leaf_problems(get_at(stats, (*layer.path, "bn"), {}),
                                          get_at(template["batch_stats"], (*layer.path, "bn")),
                                          ("mean", "var"), bn_name)
    known = {layer.path for layer in wanted}
    problems += [f"{dotted(layer.path)}: not a layer of this model"
                 for layer in layers_of(params) if layer.path not in known]
    if problems:
        raise ToolError(f"{what} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    check_runs(model, variables, image_shape, what)


def leaf_problems(have, want, keys, name) -> list[str]:
    out = []
    for key in keys:
        if key not in want:
            continue
        got = getattr(have.get(key), "shape", None)
        if got is None:
            out.append(f"{name}: '{key}' missing")
        elif tuple(got) != tuple(want[key].shape):
            out.append(f"{name}: '{key}' has shape {tuple(got)}, the model expects "
                       f"{tuple(want[key].shape)}")
    return out


def slot_problems(params, stats, want, info, name) -> list[str]:
    """A conv slot must run at its geometry and act as a conv of the template's shape."""
    if params is None:
        return [f"{name}: missing"]
    x = jax.ShapeDtypeStruct(info.input_shape, jnp.float32)
    try:
        fused = jax.eval_shape(fuse_slot, params, stats)
        jax.eval_shape(lambda p, s, xx: apply_slot(p, s, xx, info.geometry, False)[0],
                       params, stats, x)
    except Exception as exc:  # noqa: BLE001 - any shape failure means the tensors disagree
        return [f"{name}: tensors do not fit together ({first_line(exc)})"]
    got, expect = tuple(fused["kernel"].shape), tuple(want["kernel"].shape)
    if got != expect:
        return [f"{name}: acts as a conv with kernel (H, W, in/groups, out) = {got}, "
                f"the model expects {expect}"]
    return []


def check_runs(model, variables, image_shape, what: str = "checkpoint"):
    """The whole network must trace on one image (catches anything the layer checks miss)."""
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       image_spec(image_shape))
    except Exception as exc:  # noqa: BLE001
        raise ToolError(f"{what} does not run on {type(model).__name__}: {first_line(exc)}") from exc


def first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
