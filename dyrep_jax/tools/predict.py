"""Logits of a network on a batch of images stored as .npy.

    python -m dyrep_jax.tools.predict --checkpoint DIR --images x.npy --output y.npy \\
        [--fused] [--batch-size N]

x.npy: float32 (N, H, W, C), already normalized as the network expects.
y.npy: float32 (N, num_classes) logits. DIR is a training workdir, an
imported run (`import_torch`) or a fused export (DIR/fused); see
`network_dir.py` for how the model is found. `--fused` fuses a run's
checkpoint first (a fused export is always fused). Compute is float32.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from dyrep_jax.tools.arch import image_shape_of
from dyrep_jax.tools.errors import ToolError, run_main
from dyrep_jax.tools.network_dir import load_network


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dyrep_jax.tools.predict",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory or fused export directory")
    p.add_argument("--images", required=True, help="float32 NHWC images (.npy)")
    p.add_argument("--output", required=True, help="where to write float32 logits (.npy)")
    p.add_argument("--fused", action="store_true", help="fuse the checkpoint before predicting")
    p.add_argument("--batch-size", type=int, default=256)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, sys.argv[1:] if argv is None else argv)


def run(argv) -> np.ndarray:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be positive, got {args.batch_size}")
    images = load_images(args.images)
    net = load_network(args.checkpoint, fuse=args.fused)
    check_images(images, image_shape_of(net.arch))
    logits = predict_logits(net.model, net.variables, images, args.batch_size)
    np.save(args.output, logits)
    print(f"wrote logits {logits.shape} to {args.output} ({net.source}, "
          f"{'fused' if net.fused else 'unfused'})")
    return logits


def load_images(path: str) -> np.ndarray:
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
    return images.astype(np.float32, copy=False)


def check_images(images: np.ndarray, image_shape) -> None:
    channels = image_shape[-1]
    if images.shape[-1] != channels:
        raise ToolError(f"images have {images.shape[-1]} channels (last axis of shape "
                        f"{images.shape}), the network expects {channels}: NHWC layout")
    if images.shape[0] == 0:
        raise ToolError("the images file holds no image")


def predict_logits(model, variables, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Inference in batches; the last batch is zero-padded so one compiled program serves all."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    size = min(batch_size, images.shape[0])
    out = []
    for start in range(0, images.shape[0], size):
        chunk = images[start:start + size]
        pad = size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(apply(variables, chunk))[:size - pad])
    return np.concatenate(out).astype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
