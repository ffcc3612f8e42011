"""Open any directory holding a network: a training workdir, an imported run, a fused export.

- fused export (`params/` + `arch.json`, written by training or --mode=export):
  the deploy model with its fused parameters;
- run (`checkpoints/`, from training or `import_torch`): the newest readable
  checkpoint's params and batch_stats, grown structure included. The model is
  described by DIR/arch.json (imports write one), else by DIR/fused/arch.json
  (a finished training run), else inferred from the parameters and the
  checkpoint's `meta.model` (rules in `arch.py`).

`fuse=True` turns a run into its deploy form (`fuse_network`), as export does.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import jax
import numpy as np

from dyrep_jax import checkpoint as ckpt
from dyrep_jax.models import fuse_network
from dyrep_jax.state import variables_of
from dyrep_jax.tools.arch import (
    build_model,
    image_shape_of,
    infer_arch,
    read_arch_file,
    with_bn_layout,
)
from dyrep_jax.tools.errors import ToolError
from dyrep_jax.tools.fit import check_fits, first_line

log = logging.getLogger("dyrep_jax")


class Network(NamedTuple):
    model: object  # flax module (deploy form when `fused`)
    variables: dict
    arch: dict
    fused: bool
    source: str  # what was loaded, for messages


def load_network(directory: str, fuse: bool = False) -> Network:
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise ToolError(f"no such directory: {directory}")
    if os.path.isdir(os.path.join(directory, "params")) and read_arch_file(directory):
        return load_fused_dir(directory)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        return load_run_dir(directory, fuse)
    raise ToolError(f"{directory} holds no network: expected checkpoints/ (a training or "
                    "imported run) or params/ + arch.json (a fused export)")


def load_fused_dir(directory: str) -> Network:
    try:
        variables, arch = ckpt.load_fused(directory)
    except Exception as exc:  # noqa: BLE001 - unreadable export
        raise ToolError(f"cannot read the fused network in {directory}: {first_line(exc)}") from exc
    model = build_model(arch, deploy=True)
    check_fits(model, variables, image_shape_of(arch), what=f"fused network in {directory}")
    return Network(model, variables, arch, True, f"fused export {directory}")


def load_run_dir(directory: str, fuse: bool) -> Network:
    step, state, meta = restore_newest(os.path.join(directory, "checkpoints"))
    variables = variables_of(state)
    arch = run_arch(directory, meta, variables["params"])
    model = build_model(arch)
    what = f"checkpoint at step {step} in {directory}"
    check_fits(model, variables, image_shape_of(arch), what=what)
    source = f"{what} (epoch {meta.get('epoch', '?')})"
    if not fuse:
        return Network(model, variables, arch, False, source)
    fused = jax.tree_util.tree_map(np.asarray, jax.jit(fuse_network)(variables))
    return Network(build_model(arch, deploy=True), fused, arch, True, source)


def run_arch(directory: str, meta: dict, params) -> dict:
    """Arch of a run: DIR/arch.json, DIR/fused/arch.json, or inferred (see module docstring)."""
    model_name = meta.get("model")
    for candidate in (directory, os.path.join(directory, "fused")):
        arch = read_arch_file(candidate)
        if arch is not None and (model_name is None or arch["model"] == model_name):
            return with_bn_layout(arch, params)
    if model_name is None:
        raise ToolError(f"{directory}: the checkpoint does not name its model (meta.model) and "
                        "there is no arch.json; write one with at least {\"model\": NAME}")
    return infer_arch(model_name, params)


def restore_newest(checkpoint_dir: str):
    """(step, state, meta) of the newest checkpoint that can be read; the optimizer is not read."""
    try:
        found = ckpt.restore_dir(checkpoint_dir)
    except ckpt.CheckpointError as exc:
        raise ToolError(first_line(exc)) from exc
    if found is None:
        raise ToolError(f"no checkpoint in {checkpoint_dir}")
    return found
