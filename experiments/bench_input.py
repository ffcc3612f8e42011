"""Loader-only throughput: how many images/s the host input pipeline delivers (no model).

Prints one JSON line. Optionally also times the jitted device augmentation on its own,
since for CIFAR that part runs on the accelerator, not in the host iterator.

With a host augment (imagenet, imagenet_strong) on a TFDS dataset, it also measures the
ImageNet host pipeline against its anchor, in the same run: a bare one-core loop doing the
same decode + crop + flip + jitter/RandAugment with PIL on JPEG bytes held in memory; our
pipeline on one thread as a ratio to it; and our pipeline with 1 and 2 grain processes.

  python experiments/bench_input.py                          # synthetic CIFAR-shaped data
  python experiments/bench_input.py --data npz:cifar10.npz --batch 128 --steps 400
  python experiments/bench_input.py --tiny                   # a few seconds, for CI
  python experiments/make_jpeg_set.py --out data_local/jpeg  # then:
  python experiments/bench_input.py --augment imagenet --data imagenet2012 --data-dir data_local/jpeg
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dyrep_jax.data import augment_on_device, build_input  # noqa: E402
from dyrep_jax.data.kinds import HOST_AUGMENTS  # noqa: E402

DEFAULT_DATA = "synthetic:32,32,3,10,50000,10000"
TINY_DATA = "synthetic:32,32,3,10,2048,256"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="dataset name as in build_input")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir")
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--steps", type=int, default=200, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--augment", default="cifar", help="none | cifar | imagenet | imagenet_strong")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device-aug", action="store_true", help="also time jitted augment_on_device")
    parser.add_argument("--tiny", action="store_true", help="small data and few steps (seconds)")
    parser.add_argument("--rounds", type=int, default=3, help="anchor/ours rounds (best kept)")
    parser.add_argument("--workers", default="1,2", help="grain process counts to time")
    args = parser.parse_args(argv)
    if args.tiny:
        args.data = TINY_DATA if args.data == DEFAULT_DATA else args.data
        args.steps, args.warmup = min(args.steps, 20), min(args.warmup, 2)
    return args


def train_batches(inp):
    """Endless train batches, epoch after epoch."""
    for epoch in itertools.count():
        yield from inp.train_iter(epoch)


def time_host(inp, steps: int, warmup: int) -> float:
    batches = train_batches(inp)
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    images = 0
    for _ in range(steps):
        images += next(batches)["image"].shape[0]
    return images / (time.perf_counter() - start)


def time_device_aug(inp, steps: int) -> float:
    import jax

    augment = jax.jit(augment_on_device, static_argnames="kind")
    batch = next(inp.train_iter(0))["image"]
    key = jax.random.key(0)
    augment(key, batch, inp.mean, inp.std, kind=inp.device_augment).block_until_ready()
    start = time.perf_counter()
    for step in range(steps):
        out = augment(jax.random.fold_in(key, step), batch, inp.mean, inp.std, kind=inp.device_augment)
    out.block_until_ready()
    return steps * batch.shape[0] / (time.perf_counter() - start)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.augment in HOST_AUGMENTS and not args.data.startswith(("npz:", "synthetic:", "digits")):
        from host_pipeline_bench import compare_host_pipeline

        return compare_host_pipeline(args)
    start = time.perf_counter()
    inp = build_input(
        args.data, data_dir=args.data_dir, global_batch_size=args.batch,
        eval_batch_size=args.batch, seed=0, augment=args.augment, image_size=args.image_size,
    )
    result = {
        "data": args.data, "augment": args.augment, "batch": args.batch, "steps": args.steps,
        "image_shape": list(inp.image_shape), "build_s": round(time.perf_counter() - start, 3),
        "host_images_per_s": round(time_host(inp, args.steps, args.warmup), 1),
    }
    if args.device_aug:
        result["device_aug_images_per_s"] = round(time_device_aug(inp, args.steps), 1)
        import jax

        result["device_aug_backend"] = jax.default_backend()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
