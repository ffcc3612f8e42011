"""The train/eval input pipeline the training loop consumes: `build_input` and `InputPipeline`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import sampling
from .catalog import open_source
from .engines import Batch, grain_batches, process_batches, thread_batches
from .errors import DataError
from .kinds import AUGMENTS, HOST_AUGMENTS, Transform
from .source import ArraySplit, Split, check_labels, head, label_range_message

DEFAULT_IMAGE_SIZE = 224  # output size for variable-size datasets when image_size is None


@dataclass(frozen=True)
class InputPipeline:
    """Deterministic, resumable, per-process batches of one dataset.

    Train batches are a pure function of (seed, epoch, step); a process gets its own
    contiguous rows of every global batch. Images stay uint8 until the device.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: np.ndarray
    std: np.ndarray
    device_augment: str
    global_batch_size: int
    eval_batch_size: int
    seed: int
    process_index: int
    process_count: int
    train_transform: Transform | None  # host-side, per example; None: slice arrays as stored
    eval_transform: Transform | None
    streaming: bool  # read through grain (TFDS) rather than a local thread pool
    host_threads: int
    host_workers: int = 0  # >0: host transforms run in this many grain processes

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.global_batch_size

    @property
    def num_eval_steps(self) -> int:
        return -(-self.num_test // self.eval_batch_size)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def local_eval_batch_size(self) -> int:
        return self.eval_batch_size // self.process_count

    def train_iter(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches for steps start_step..steps_per_epoch-1 of `epoch`."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        permutation = sampling.epoch_permutation(self.seed, epoch, self.num_train)
        rows = sampling.train_indices(
            permutation, self.global_batch_size, start_step, self.steps_per_epoch,
            self.process_index, self.process_count,
        )
        for images, labels in self._read(self.train, rows, self.train_transform, epoch):
            yield {"image": images, "label": labels}

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]:
        """The test split once, in order; rows past the end are zero images with mask False."""
        rows = sampling.eval_indices(
            self.num_test, self.eval_batch_size, self.process_index, self.process_count
        )
        batches = self._read(self.test, rows, self.eval_transform, epoch=None)
        for row, (images, labels) in zip(rows, batches, strict=True):
            yield {"image": images, "label": labels, "mask": row != sampling.PAD}

    def _read(
        self, split: Split, rows: np.ndarray, transform: Transform | None, epoch: int | None
    ) -> Iterator[Batch]:
        if rows.size == 0:
            return
        if transform is None and isinstance(split, ArraySplit):
            yield from _slice_batches(split, rows)
            return

        # streamed splits hand transforms the decoded PIL image: no round trip through numpy
        read = getattr(split, "decoded_example", split.example) if transform else split.example

        def load(index: int) -> tuple[np.ndarray, int]:
            if index == sampling.PAD:
                return np.zeros(self.image_shape, np.uint8), 0
            image, label = read(index)
            if not 0 <= label < self.num_classes:  # streamed splits: checked as they are read
                raise DataError(label_range_message(self.name, label, label, self.num_classes))
            if transform is not None:
                rng = None if epoch is None else sampling.example_rng(self.seed, epoch, index)
                image = transform(image, rng)
            return image, label

        if self.host_workers > 0:
            yield from process_batches(load, rows, self.host_workers)
            return
        engine = grain_batches if self.streaming else thread_batches
        yield from engine(load, rows.reshape(-1), rows.shape[1], self.host_threads)


def _slice_batches(split: ArraySplit, rows: np.ndarray) -> Iterator[Batch]:
    """Fast path for in-memory arrays without host augmentation: one gather per batch."""
    for row in rows:
        padding = row == sampling.PAD
        images, labels = split.take(np.where(padding, 0, row))
        if padding.any():
            images[padding] = 0
            labels[padding] = 0
        yield images, labels


def build_input(
    name: str, *, data_dir: str | None = None, global_batch_size: int, eval_batch_size: int,
    seed: int, process_index: int = 0, process_count: int = 1, augment: str = "cifar",
    image_size: int | None = None, max_train_examples: int | None = None,
    max_test_examples: int | None = None, color_jitter: float = 0.0,
    random_erasing: float = 0.0, num_classes: int | None = None,
    host_threads: int | None = None, host_workers: int = 0,
) -> InputPipeline:
    """Open dataset `name` and set up deterministic per-process train/eval iterators.

    name: 'digits' | 'npz:PATH' | 'cifar10' | 'cifar100' | 'imagenet2012' |
    'synthetic:H,W,C,NUM_CLASSES,N_TRAIN,N_TEST'. Batch sizes are global (summed over all
    processes). `augment` picks the recipe: 'cifar' runs on the device (augment_on_device;
    the iterator yields raw pixels), 'imagenet'/'imagenet_strong' run on the host inside the
    train iterator, with `color_jitter` as the jitter strength of 'imagenet' and
    `random_erasing` the erasing probability of both. `image_size` resizes on the host (None:
    native size, 224 for variable-size data). `num_classes` (None: the dataset's) bounds the
    labels, which are checked once here (streamed TFDS splits: metadata here, each label as
    read). `host_threads`: decode/augment threads (default min(16, CPUs)); `host_workers` > 0
    runs the host transforms in grain processes instead (batches are identical either way).
    """
    _check_args(global_batch_size, eval_batch_size, process_index, process_count, augment)
    _check_host_options(color_jitter, random_erasing, host_workers)
    source = open_source(name, data_dir)
    train = head(source.train, _check_limit("max_train_examples", max_train_examples))
    test = head(source.test, _check_limit("max_test_examples", max_test_examples))
    threads = host_threads or min(16, os.cpu_count() or 1)

    native, size = source.image_shape, _output_size(source.image_shape, image_size)
    host_side = augment in HOST_AUGMENTS or size != tuple(native[:2])
    train_transform, eval_transform = _host_transforms(
        host_side, augment, size, (color_jitter, random_erasing), source.mean, source.std
    )
    if source.streaming and not host_side:
        train, test = _cache_in_memory(train, threads), _cache_in_memory(test, threads)
    classes = num_classes or source.num_classes
    _check_source_labels(source.name, source.num_classes, classes, {"train": train, "test": test})

    pipeline = InputPipeline(
        name=source.name, train=train, test=test, num_classes=classes,
        image_shape=(*size, native[2]), mean=source.mean, std=source.std,
        device_augment="cifar" if augment == "cifar" else "none",
        global_batch_size=global_batch_size, eval_batch_size=eval_batch_size, seed=seed,
        process_index=process_index, process_count=process_count,
        train_transform=train_transform, eval_transform=eval_transform,
        streaming=source.streaming and host_side, host_threads=threads,
        host_workers=host_workers if host_side else 0,
    )
    _check_sizes(pipeline, name, global_batch_size)
    return pipeline


def _check_host_options(color_jitter: float, random_erasing: float, host_workers: int):
    _check_strengths(color_jitter, random_erasing)
    if host_workers < 0:
        raise DataError(f"host_workers={host_workers} must be >= 0 (0: threads in this process)")


def _check_sizes(pipeline: InputPipeline, name: str, global_batch_size: int) -> None:
    """At least one training batch and a non-empty test split."""
    if pipeline.steps_per_epoch == 0:
        raise DataError(
            f"{name}: {pipeline.num_train} train examples are fewer than one global batch "
            f"({global_batch_size}); lower the batch size or raise max_train_examples"
        )
    if pipeline.num_test == 0:
        raise DataError(f"{name}: the test split is empty")


def _check_source_labels(name: str, source_classes: int, classes: int, splits: dict) -> None:
    """Arrays: every label now. Streamed splits: the dataset's class count now, labels as read."""
    for split_name, split in splits.items():
        if isinstance(split, ArraySplit):
            check_labels(split.labels, classes, f"{name} ({split_name} split)")
        elif source_classes > classes:
            raise DataError(label_range_message(
                f"{name} (dataset metadata)", 0, source_classes - 1, classes))


def _host_transforms(host_side, augment, size, strengths, mean, std):
    """(train, eval) per-example host transforms; (None, None) when batches are sliced as stored.

    Imported lazily so the device-augmented paths do not need PIL.
    """
    if not host_side:
        return None, None
    from .host_augment import make_eval_transform, make_train_transform

    eval_transform = make_eval_transform(size)
    if augment in HOST_AUGMENTS:
        return make_train_transform(augment, size, *strengths, mean, std), eval_transform
    return eval_transform, eval_transform  # only resizing to `size`


def _check_args(global_batch_size, eval_batch_size, process_index, process_count, augment):
    if augment not in AUGMENTS:
        raise DataError(f"unknown augment {augment!r}; expected one of {AUGMENTS}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} outside 0..{process_count - 1}")
    for label, size in (("global_batch_size", global_batch_size), ("eval_batch_size", eval_batch_size)):
        if size < 1 or size % process_count:
            raise DataError(
                f"{label}={size} must be positive and divisible by process_count={process_count}"
            )


def _check_strengths(color_jitter: float, random_erasing: float) -> None:
    if not color_jitter >= 0:
        raise DataError(f"color_jitter={color_jitter} must be >= 0 (0 turns it off)")
    if not 0 <= random_erasing <= 1:
        raise DataError(f"random_erasing={random_erasing} is a probability; use 0..1 (0: off)")


def _check_limit(label: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise DataError(f"{label}={value} must be positive (or None for the whole split)")
    return value


def _output_size(native: tuple, image_size: int | None) -> tuple[int, int]:
    """(H, W) the model sees: image_size squared, else native, else DEFAULT_IMAGE_SIZE."""
    if image_size is not None:
        return (image_size, image_size)
    if None in native[:2]:
        return (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    return (native[0], native[1])


def _cache_in_memory(split: Split, threads: int) -> ArraySplit:
    from .tfds_source import cache_split

    return cache_split(split, threads)

