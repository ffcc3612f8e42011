"""Export the fused deploy network as a PyTorch state_dict with the reference naming.

    python -m dyrep_jax.tools.export_torch --checkpoint DIR --out model.pt

DIR: a run (training or imported; fused first) or a fused export. The file is
`torch.save` of a plain dict: per conv `NAME.weight` (OIHW) and `NAME.bias`
(BN already folded in, so no BN tensors), per linear `NAME.weight` (out, in)
and `NAME.bias`, e.g. for resnet18 `conv1.weight, conv1.bias,
layer1.0.conv1.weight, ..., fc.weight, fc.bias`. It loads with
`load_state_dict(strict=True)` into the plain reference architecture whose
convs have `bias=True` and whose BNs are identities.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from dyrep_jax.rep.tree import get_at
from dyrep_jax.tools.arch import image_shape_of
from dyrep_jax.tools.errors import ToolError, check_directory_arg, run_main
from dyrep_jax.tools.layout import in_call_order, layers_of
from dyrep_jax.tools.names import naming_for
from dyrep_jax.tools.network_dir import load_network


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dyrep_jax.tools.export_torch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory or fused export directory")
    p.add_argument("--out", required=True, help="output file (torch.save)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)


def run(argv) -> dict:
    args = parse_args(argv)
    check_out_file(args.out)
    check_directory_arg(args.checkpoint, "--checkpoint",
                        "a .pth file is imported with dyrep_jax.tools.import_torch")
    net = load_network(args.checkpoint, fuse=True)
    naming = naming_for(net.arch["model"])
    order = in_call_order(layers_of(net.variables["params"]), net.model, net.variables,
                          image_shape_of(net.arch))
    state = deploy_state_dict(net.variables["params"], naming, order)
    save_torch(state, args.out)
    print(f"wrote {len(state)} tensors of the fused {net.arch['model']} ({net.source}) to "
          f"{args.out}")
    return state


def check_out_file(path: str) -> None:
    """--out must name a file (torch.save cannot write a folder); its folder is created."""
    if os.path.isdir(path):
        raise ToolError(f"--out {path} is a folder; give a file path such as "
                        f"{os.path.join(path, 'model.pt')}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ToolError(f"--out {path}: {parent} is a file, not a folder")


def deploy_state_dict(params, naming, layers=None) -> dict:
    """{torch key: numpy array} of fused deploy params, in the order of `layers`.

    Pass `layout.in_call_order(...)` for network order (a restored tree is sorted by name).
    """
    state = {}
    for layer in layers or layers_of(params):
        node = get_at(params, layer.path)
        if layer.kind == "unit":
            conv = node["conv"]
            if "kxk" in conv or "bias" not in conv:
                raise ToolError(f"{'.'.join(layer.path)}: not a fused conv (fuse the network first)")
            name = naming.unit(layer.path).conv
            state[f"{name}.weight"] = np.transpose(np.asarray(conv["kernel"]), (3, 2, 0, 1))
            state[f"{name}.bias"] = np.asarray(conv["bias"])
        else:
            name = naming.dense(layer.path)
            state[f"{name}.weight"] = np.asarray(node["kernel"]).T
            state[f"{name}.bias"] = np.asarray(node["bias"])
    return state


def save_torch(state: dict, path: str) -> None:
    import torch  # optional dependency: only the interop tools need it

    tensors = {key: torch.from_numpy(np.array(value, np.float32))
               for key, value in state.items()}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    torch.save(tensors, path)


if __name__ == "__main__":
    sys.exit(main())
