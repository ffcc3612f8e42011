"""Import a reference PyTorch checkpoint (DyRep, static DBB or plain) as a run of ours.

    python -m dyrep_jax.tools.import_torch --arch resnet18 --checkpoint ckpt.pth.tar \\
        --out DIR [--num-classes N] [--dbb] [--config configs/X.py] [--trust-pickle]

Writes DIR/checkpoints (same layout as a training run, grown structure kept)
and DIR/arch.json. Then, for example:

    python -m dyrep_jax.tools.predict --checkpoint DIR --images x.npy --output y.npy
    python -m dyrep_jax.main --config configs/X.py --workdir DIR --mode=eval \\
        --config.model.name=resnet18 --config.model.num_classes=N [--config.dyrep.mode=dbb]

Width and class count are read off the tensors (stem conv, classifier); the
structure of every conv comes from its tensors and is cross-checked with the
file's `dyrep.dbb_graph`. Missing or unexpected keys stop the import (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

from dyrep_jax.models import create_model, default_input_shape
from dyrep_jax.rep.tree import get_at
from dyrep_jax.tools.arch import reference_layers
from dyrep_jax.tools.convert import convert_state
from dyrep_jax.tools.errors import ToolError, run_main
from dyrep_jax.tools.fit import abstract_variables, check_fits
from dyrep_jax.tools.graph_check import check_graph
from dyrep_jax.tools.layout import layers_of, slot_out_channels
from dyrep_jax.tools.names import IMPORTABLE, naming_for
from dyrep_jax.tools.run_writer import check_empty_target, load_config, write_run
from dyrep_jax.tools.torch_file import load_reference


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dyrep_jax.tools.import_torch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=IMPORTABLE)
    p.add_argument("--checkpoint", required=True, help="reference .pth.tar / .pth file")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--num-classes", type=int, default=None,
                   help="expected classes (default: read off the classifier)")
    p.add_argument("--dbb", action="store_true",
                   help="static DBB baseline: no BN after the 3x3 convs")
    p.add_argument("--config", default=None,
                   help="config whose optimizer layout the checkpoint should match "
                        "(default: base config: SGD + momentum + weight decay)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle arbitrary objects (only for files you trust)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)


def run(argv) -> dict:
    args = parse_args(argv)
    check_empty_target(args.out)
    config = load_config(args.config)
    ref = load_reference(args.checkpoint, args.trust_pickle)
    naming = naming_for(args.arch)
    arch = arch_from_tensors(args.arch, ref.state, naming, args.num_classes, args.dbb)
    model = create_model(arch["model"], num_classes=arch["num_classes"], width=arch["width"],
                         with_bn_after_3x3=arch["with_bn_after_3x3"])
    template = abstract_variables(model, arch["image_shape"])
    converted = convert_state(ref.state, naming, template["params"],
                              hint_for=lambda m, u: dbb_hint(m, u, naming, template, args.dbb))
    check_graph(converted.blocks, ref.dbb_graph)
    check_fits(model, converted.variables, arch["image_shape"],
               name_of=torch_names(converted.sources), what=args.checkpoint)
    arch.update(epoch=ref.epoch, source=os.path.abspath(args.checkpoint), dtype="float32")
    name = f"imported:{os.path.basename(args.checkpoint)}"
    path = write_run(args.out, converted.variables, arch, ref.epoch, name, config)
    print(f"imported {len(ref.state)} tensors from {args.checkpoint} as {arch['model']} "
          f"(width {arch['width']:g}, {arch['num_classes']} classes, "
          f"{len(converted.blocks)} grown convs, epoch {ref.epoch}) into {path}")
    return arch


def arch_from_tensors(model_name, state, naming, num_classes, dbb) -> dict:
    """Classes from the classifier's weight, width from the stem conv's output channels."""
    head = f"{naming.dense(naming.classifier)}.weight"
    if head not in state:
        raise ToolError(f"missing keys (1): {head} (the classifier of {model_name})")
    found_classes = int(state[head].shape[0])
    if num_classes is not None and num_classes != found_classes:
        raise ToolError(f"--num-classes {num_classes} but the file's classifier {head} has "
                        f"{found_classes} outputs")
    ref_params, _, _ = reference_layers(model_name)
    ref_channels = slot_out_channels(get_at(ref_params, (*naming.stem, "conv")))
    width = torch_slot_out_channels(state, naming.unit(naming.stem).conv) / ref_channels
    return {"model": model_name, "num_classes": found_classes, "width": width,
            "with_bn_after_3x3": not dbb, "image_shape": list(default_input_shape(model_name))}


def torch_slot_out_channels(state, module: str) -> int:
    """Output channels of the (possibly grown) torch conv at `module`."""
    while f"{module}.weight" not in state:
        inner = f"{module}.dbb_kxk.conv"
        if not any(key.startswith(inner + ".") for key in state):
            raise ToolError(f"missing keys (1): {module}.weight (the stem conv)")
        module = inner
    return int(state[f"{module}.weight"].shape[0])


def torch_names(sources: dict):
    """name_of(our layer path, part) -> torch module path, for fit messages."""

    def name_of(path, part):
        names = sources.get(tuple(path))
        if names is None or isinstance(names, str):
            return names or ".".join(path)
        return names.bn if part == "bn" else names.conv

    return name_of


def dbb_hint(missing, unexpected, naming, template, dbb: bool) -> str:
    """Suggest --dbb (or dropping it) when only BN tensors after convs disagree."""
    bn_modules = {naming.unit(layer.path).bn for layer in layers_of(template["params"])
                  if layer.kind == "unit"}

    def all_bn(keys):
        return bool(keys) and all(key.rsplit(".", 1)[0] in bn_modules for key in keys)

    if not dbb and all_bn(missing) and not unexpected:
        return ("If this is a static DBB baseline checkpoint (no BN after the 3x3 convs), "
                "pass --dbb")
    if dbb and all_bn(unexpected) and not missing:
        return "The file has BNs after the 3x3 convs: drop --dbb"
    return ""


if __name__ == "__main__":
    sys.exit(main())
