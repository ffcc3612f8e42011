"""What every dataset loader hands to the pipeline: two random-access splits plus metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import DataError


class Split(Protocol):
    """A random-access split: `len()` examples, each an (HWC uint8 image, int label) pair."""

    def __len__(self) -> int: ...

    def example(self, index: int) -> tuple[np.ndarray, int]: ...


@dataclass(frozen=True)
class ArraySplit:
    """A split held in memory, so whole batches come from one fancy-indexing call."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def example(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def head(self, count: int | None) -> ArraySplit:
        """The first `count` examples (all when None)."""
        if count is None or count >= len(self):
            return self
        return ArraySplit(self.images[:count], self.labels[:count])


@dataclass(frozen=True)
class Source:
    """A dataset ready for the pipeline.

    `image_shape` is (H, W, C) with None for sizes that vary between examples (ImageNet).
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    mean: np.ndarray
    std: np.ndarray
    streaming: bool = False  # examples are decoded one by one (TFDS) rather than sliced from arrays

    @property
    def fixed_size(self) -> bool:
        return None not in self.image_shape[:2]


def head(split: Split, count: int | None) -> Split:
    """The first `count` examples of any split (all when None)."""
    if count is None or count >= len(split):
        return split
    if isinstance(split, ArraySplit):
        return split.head(count)
    return _HeadSplit(split, count)


@dataclass(frozen=True)
class _HeadSplit:
    base: Split
    count: int

    def __len__(self) -> int:
        return self.count

    def example(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.base.example(index)

    def decoded_example(self, index: int):
        """The base's decoded (PIL) example where it has one (streamed TFDS), else example()."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        return getattr(self.base, "decoded_example", self.base.example)(index)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Refuse labels outside [0, num_classes): they would train silently as an all-zero one-hot."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(label_range_message(where, low, high, num_classes))


def label_range_message(where: str, low: int, high: int, num_classes: int) -> str:
    return (
        f"{where}: labels span {low}..{high} but must lie in [0, {num_classes}); fix the labels "
        f"(0-based class ids), or set model.num_classes to at least {high + 1} "
        "(0 takes it from the data)"
    )
