"""Logits of a network on a batch of images stored as .npy.

    python -m dyrep_jax.tools.predict --checkpoint DIR --images x.npy --output y.npy \\
        [--fused] [--batch-size N] [--normalize]
    python -m dyrep_jax.tools.predict --exported DIR/fused/model.jaxexport \\
        --images x.npy --output y.npy [--normalize]

x.npy: float32 (N, H, W, C), already normalized as the network expects, or
uint8 pixels with `--normalize`, which applies ((x / 255 - mean) / std) with
the network's mean and std from its arch.json (written by training).
y.npy: float32 (N, num_classes) logits. DIR is a training workdir, an
imported run (`import_torch`) or a fused export (DIR/fused); see
`network_dir.py` for how the model is found. `--fused` fuses a run's
checkpoint first (a fused export is always fused). `--exported` runs the
`jax.export` artifact (`serving.py`) with no model code. Compute is float32.

Input checks, before anything is computed: the output folder exists; images
hold no NaN/inf; H, W, C equal the network's image shape when it is recorded
(a training run's arch.json, or the exported program; an imported run only
fixes C, since the reference checkpoint does not record its image size);
values far outside a normalized range (|x| > 20) get a loud warning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from dyrep_jax import serving
from dyrep_jax.tools.errors import ToolError, check_directory_arg, run_main

UNNORMALIZED_ABOVE = 20.0  # |x| beyond this is far outside what normalized images reach


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dyrep_jax.tools.predict",
                                description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run directory or fused export directory")
    source.add_argument("--exported", help="a model.jaxexport file (jax.export artifact)")
    p.add_argument("--images", required=True, help="float32 NHWC images (.npy)")
    p.add_argument("--output", required=True, help="where to write float32 logits (.npy)")
    p.add_argument("--fused", action="store_true", help="fuse the checkpoint before predicting")
    p.add_argument("--normalize", action="store_true",
                   help="input is uint8 pixels: apply the network's mean/std first")
    p.add_argument("--batch-size", type=int, default=256)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)


def run(argv) -> np.ndarray:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be positive, got {args.batch_size}")
    if args.exported and args.fused:
        raise ToolError("--fused applies to --checkpoint only: an exported network is fused")
    output = output_path(args.output)
    images = load_images(args.images)
    if args.exported:
        runner = ExportedRunner(args.exported)
    else:
        runner = NetworkRunner(args.checkpoint, args.fused)
    images = prepare_images(images, runner.arch, args.normalize)
    check_images(images, runner.image_shape, runner.strict_shape)
    logits = predict_in_batches(runner.apply, images, args.batch_size)
    np.save(output, logits)
    print(f"wrote logits {logits.shape} to {output} ({runner.source})")
    return logits


class NetworkRunner:
    """A network directory (run or fused export) and its jitted forward pass."""

    def __init__(self, directory: str, fuse: bool):
        # Imported here: the --exported path runs without any model code.
        from dyrep_jax.tools.arch import image_shape_of
        from dyrep_jax.tools.network_dir import load_network

        check_directory_arg(directory, "--checkpoint", "for a .jaxexport file use --exported")
        net = load_network(directory, fuse=fuse)
        self.arch = net.arch
        self.image_shape = image_shape_of(net.arch)
        self.strict_shape = "mean" in net.arch and "std" in net.arch  # written by training
        self.source = f"{net.source}, {'fused' if net.fused else 'unfused'}"
        forward = jax.jit(lambda v, x: net.model.apply(v, x, train=False))
        self.apply = lambda x: forward(net.variables, x)


class ExportedRunner:
    """A model.jaxexport file; its arch.json (for --normalize) is read from the same folder."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            raise ToolError(f"--exported {path} is a directory; pass the file inside it, e.g. "
                            f"{os.path.join(path, serving.EXPORT_FILE)}")
        if not os.path.isfile(path):
            raise ToolError(f"--exported file not found: {path}")
        try:
            exported = serving.load_exported(path)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is a bad input
            raise ToolError(f"{path} is not a jax.export artifact ({type(exc).__name__}); "
                            "expected DIR/fused/model.jaxexport written by training") from exc
        self.arch = read_json(os.path.join(os.path.dirname(os.path.abspath(path)), "arch.json"))
        self.image_shape = serving.exported_image_shape(exported)
        self.strict_shape = True
        self.source = f"exported {path}"
        self.apply = exported.call


def read_json(path: str) -> dict:
    """The arch.json beside an export ({} when absent: only --normalize needs it)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            arch = json.load(f)
    except (OSError, ValueError) as exc:
        raise ToolError(f"cannot read {path}: {exc}") from exc
    return arch if isinstance(arch, dict) else {}


def output_path(path: str) -> str:
    """The file np.save will write (it appends .npy); its folder must exist already."""
    real = path if path.endswith(".npy") else path + ".npy"
    folder = os.path.dirname(os.path.abspath(real))
    if not os.path.isdir(folder):
        raise ToolError(f"--output folder does not exist: {folder}; create it first")
    if os.path.isdir(real):
        raise ToolError(f"--output {real} is a directory; give a file name such as "
                        f"{os.path.join(real, 'logits.npy')}")
    return real


def load_images(path: str) -> np.ndarray:
    """The finite 4-d array in `path`, dtype kept (uint8 stays uint8 for --normalize)."""
    if not os.path.isfile(path):
        raise ToolError(f"images file not found: {path}")
    try:
        images = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ToolError(f"cannot read {path} as a .npy array: {exc}") from exc
    if not isinstance(images, np.ndarray) or not np.issubdtype(images.dtype, np.number):
        raise ToolError(f"{path}: expected one numeric array saved with np.save")
    if images.ndim != 4:
        hint = "; add a batch axis for a single image" if images.ndim == 3 else ""
        raise ToolError(f"{path}: expected images shaped (batch, height, width, channels), got "
                        f"shape {images.shape}{hint}")
    if images.shape[0] == 0:
        raise ToolError(f"{path} holds no image (batch size 0)")
    finite = np.isfinite(images)
    if not finite.all():
        bad = np.unique(np.nonzero(~finite)[0])
        raise ToolError(f"{path}: NaN or inf in {bad.size} of {images.shape[0]} images "
                        f"(first: index {int(bad[0])}); fix or drop them")
    return images


def prepare_images(images: np.ndarray, arch: dict, normalize: bool) -> np.ndarray:
    """float32 images: uint8 pixels normalized with the arch's mean/std under --normalize."""
    if not normalize:
        if images.dtype == np.uint8:
            print("WARNING: the images are uint8 pixels but --normalize was not given; the "
                  "network expects normalized float32 input.", file=sys.stderr)
        return images.astype(np.float32, copy=False)
    if images.dtype != np.uint8:
        raise ToolError(f"--normalize expects uint8 pixels (0..255), got {images.dtype}; drop "
                        "--normalize if the images are already normalized")
    if "mean" not in arch or "std" not in arch:
        raise ToolError("--normalize needs the network's mean and std, but its arch.json has "
                        "none (an imported run?); normalize the images yourself")
    mean = np.asarray(arch["mean"], np.float32)
    std = np.asarray(arch["std"], np.float32)
    if mean.shape != (images.shape[-1],) or std.shape != mean.shape:
        raise ToolError(f"arch.json mean/std have {mean.size}/{std.size} values, the images "
                        f"{images.shape[-1]} channels (last axis of shape {images.shape})")
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def check_images(images: np.ndarray, image_shape, strict_shape: bool) -> None:
    """Refuse images of another shape than the network's; warn on raw pixels."""
    image_shape = tuple(image_shape)
    if images.shape[-1] != image_shape[-1]:
        raise ToolError(f"images have {images.shape[-1]} channels (last axis of shape "
                        f"{images.shape}), the network expects {image_shape[-1]}: NHWC layout")
    if strict_shape and images.shape[1:] != image_shape:
        raise ToolError(f"images are {images.shape[1:]} (H, W, C), the network was trained on "
                        f"{image_shape}; resize them to {image_shape[0]}x{image_shape[1]}")
    peak = float(np.abs(images).max())
    if peak > UNNORMALIZED_ABOVE:
        print(f"WARNING: image values reach {peak:g}, far outside a normalized range: these "
              "look like raw pixels; logits will be meaningless. Pass --normalize for uint8 "
              "pixels, or normalize as in training ((x / 255 - mean) / std).", file=sys.stderr)


def predict_in_batches(apply, images: np.ndarray, batch_size: int) -> np.ndarray:
    """`apply` over batches; the last one is zero-padded so one compiled program serves all."""
    size = min(batch_size, images.shape[0])
    out = []
    for start in range(0, images.shape[0], size):
        chunk = images[start:start + size]
        pad = size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(apply(chunk))[:size - pad])
    return np.concatenate(out).astype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
