"""The ImageNet host pipeline against its one-core anchor (used by bench_input.py).

Anchor: a bare loop over JPEG bytes already in memory, doing with PIL what our transform
does per image (decode, random-resized-crop, flip, then color jitter or RandAugment and
random erasing), one Generator for the whole loop: no pipeline, no copies beyond PIL's own.
Ours: `InputPipeline.train_iter` on the same data, one thread, then 1 and 2 grain processes.
Per-core figures are given twice: per wall second and per CPU second of this process (all its
threads); the latter does not depend on how busy the other processes keep the cores.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
from PIL import Image

from dyrep_jax.data import build_input
from dyrep_jax.data.host_augment import color_jitter, random_resized_crop
from dyrep_jax.data.randaugment import rand_augment, random_erasing
from dyrep_jax.data.stats import IMAGENET_MEAN, IMAGENET_STD


def jpeg_bytes(name: str, data_dir: str | None, count: int) -> list[bytes]:
    """The first `count` train images as stored (undecoded JPEG bytes)."""
    import tensorflow_datasets as tfds

    records = tfds.data_source(name, split="train", data_dir=data_dir, download=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
    return [bytes(records[i]["image"]) for i in range(min(count, len(records)))]


def anchor_images_per_s(blobs: list[bytes], augment: str, size: int, jitter: float,
                        erasing: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second)."""
    rng = np.random.default_rng(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    for blob in blobs:
        image = random_resized_crop(Image.open(io.BytesIO(blob)).convert("RGB"), rng, (size, size))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if augment == "imagenet_strong":
            image = rand_augment(image, rng)
        else:
            image = color_jitter(image, rng, jitter)
        pixels = np.asarray(image, np.uint8)
        if erasing > 0:
            pixels = random_erasing(pixels, rng, IMAGENET_MEAN, IMAGENET_STD, prob=erasing)
    return (len(blobs) / (time.perf_counter() - start),
            len(blobs) / (time.process_time() - cpu_start))


def pipeline_images_per_s(inp, steps: int, warmup: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process)."""
    batches = inp.train_iter(0)
    for _ in range(warmup):  # includes starting the worker processes
        next(batches)
    start, cpu_start, images = time.perf_counter(), time.process_time(), 0
    for _ in range(steps):
        images += next(batches)["image"].shape[0]
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def compare_host_pipeline(args) -> dict:
    size = args.image_size or 224
    jitter = 0.4 if args.augment == "imagenet" else 0.0
    erasing = 0.2 if args.augment == "imagenet_strong" else 0.0

    def pipeline(**kwargs):
        return build_input(args.data, data_dir=args.data_dir, global_batch_size=args.batch,
                           eval_batch_size=args.batch, seed=0, augment=args.augment,
                           image_size=size, color_jitter=jitter, random_erasing=erasing, **kwargs)

    one_thread = pipeline(host_threads=1)
    if (args.steps + args.warmup) > one_thread.steps_per_epoch:
        raise SystemExit(f"--steps + --warmup exceed the {one_thread.steps_per_epoch} steps of "
                         "one epoch; make a larger set (make_jpeg_set.py --train)")
    blobs = jpeg_bytes(args.data, args.data_dir, args.steps * args.batch)
    anchor, ours = [], []
    for _ in range(args.rounds):  # interleaved, so both see the same machine load
        anchor.append(anchor_images_per_s(blobs, args.augment, size, jitter, erasing))
        ours.append(pipeline_images_per_s(one_thread, args.steps, args.warmup))
    (anchor_wall, anchor_cpu), (ours_wall, ours_cpu) = (
        [max(rates) for rates in zip(*runs, strict=True)] for runs in (anchor, ours))
    result = {
        "data": args.data, "augment": args.augment, "image_size": size, "batch": args.batch,
        "timed_images": args.steps * args.batch, "rounds": args.rounds,
        "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "anchor_images_per_s": round(anchor_wall, 1),
        "ours_1_thread_images_per_s": round(ours_wall, 1),
        "per_core_ratio": round(ours_wall / anchor_wall, 3),
        "anchor_images_per_cpu_s": round(anchor_cpu, 1),
        "ours_1_thread_images_per_cpu_s": round(ours_cpu, 1),
        "per_core_ratio_cpu": round(ours_cpu / anchor_cpu, 3),
    }
    for workers in (int(w) for w in args.workers.split(",")):
        rate, _ = pipeline_images_per_s(pipeline(host_workers=workers), args.steps, args.warmup)
        result[f"ours_{workers}_process_images_per_s"] = round(rate, 1)
    if "ours_1_process_images_per_s" in result and "ours_2_process_images_per_s" in result:
        result["two_vs_one_process"] = round(
            result["ours_2_process_images_per_s"] / result["ours_1_process_images_per_s"], 3)
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return result
