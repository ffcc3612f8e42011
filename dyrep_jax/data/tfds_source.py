"""TensorFlow Datasets through `tfds.data_source`: random access to prepared ArrayRecord files.

Reading needs tensorflow-datasets and grain but not TensorFlow; both are imported only
here, so the rest of the package works on machines without them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError
from .source import ArraySplit, Source, Split
from .stats import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

# name -> (train split, test split, mean, std)
TFDS_DATASETS = {
    "cifar10": ("train", "test", CIFAR_MEAN, CIFAR_STD),
    "cifar100": ("train", "test", CIFAR_MEAN, CIFAR_STD),
    "imagenet2012": ("train", "validation", IMAGENET_MEAN, IMAGENET_STD),
}
# Variable-size images always go through host transforms: we read their encoded bytes
ENCODED_READ = frozenset({"imagenet2012"})


@dataclass(frozen=True)
class TfdsSplit:
    """One TFDS split; each `example()` reads one record and decodes its image with PIL.

    For ENCODED_READ datasets we decode rather than tfds, so that pixels do not depend on
    whether OpenCV is installed (tfds prefers it) and host transforms start from the decoded
    PIL image; other datasets arrive decoded by tfds.
    """

    records: Any  # the tfds data source, opened with the image left as encoded bytes
    channels: int

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.decoded_example(index)
        array = np.asarray(image, np.uint8)
        return (array[..., None] if array.ndim == 2 else array), label

    def decoded_example(self, index: int) -> tuple[Any, int]:
        """(PIL image, label): what host transforms take without a round trip through numpy."""
        from PIL import Image

        record = self.records[int(index)]
        if isinstance(record["image"], np.ndarray):  # a source tfds decodes (fixed-size data)
            pixels = record["image"]
            return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels), \
                int(record["label"])
        image = Image.open(io.BytesIO(record["image"]))
        if self.channels == 3 and image.mode != "RGB":
            image = image.convert("RGB")
        return image, int(record["label"])


def resolve_data_dir(data_dir: str | None) -> str | None:
    """Explicit data_dir, else $TFDS_DATA_DIR, else None (tfds' default ~/tensorflow_datasets)."""
    return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def load_tfds_source(name: str, data_dir: str | None) -> Source:
    """Open both splits of a prepared TFDS dataset; never downloads."""
    train_split, test_split, mean, std = TFDS_DATASETS[name]
    data_dir = resolve_data_dir(data_dir)
    train = _open(name, train_split, data_dir, name in ENCODED_READ)
    test = _open(name, test_split, data_dir, name in ENCODED_READ)
    features = train.dataset_info.features
    num_classes = int(features["label"].num_classes)
    height, width, channels = features["image"].shape
    return Source(
        name, TfdsSplit(train, int(channels)), TfdsSplit(test, int(channels)), num_classes,
        (height, width, int(channels)), mean, std, streaming=True,
    )


def _open(name: str, split: str, data_dir: str | None, encoded: bool) -> Any:
    try:
        import grain  # noqa: F401  (needed later to read; fail early with a clear message)
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(
            f"dataset {name!r} needs the packages tensorflow-datasets and grain "
            f"(pip install tensorflow-datasets grain), which are missing ({err}). "
            "Without them, use local arrays: --config.data.dataset=npz:PATH"
        ) from err
    try:
        decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders=decoders)
    except Exception as err:  # tfds raises several unrelated types for "not there"
        raise not_prepared_error(name, data_dir, err, _is_prepared(tfds, name, data_dir)) from err


def _is_prepared(tfds: Any, name: str, data_dir: str | None) -> bool:
    try:
        return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
    except Exception:  # unknown config, unreadable dir, ...: treat as not prepared
        return False


def not_prepared_error(
    name: str, data_dir: str | None, cause: Exception, prepared: bool = False
) -> DataError:
    """One message with the three ways out of a missing (or non-ArrayRecord) TFDS dataset."""
    where = data_dir or "the tfds default (~/tensorflow_datasets)"
    if prepared:
        problem = (
            f"TFDS dataset {name!r} under data_dir={where} cannot be opened for random access "
            f"({type(cause).__name__}: {cause}); it must be prepared with file_format=array_record"
        )
    else:
        problem = (
            f"TFDS dataset {name!r} is not prepared under data_dir={where} "
            f"(no prepared ArrayRecord files found; tfds: {type(cause).__name__})"
        )
    manual = (
        " (imagenet2012 also needs the ILSVRC2012 tar files in <DIR>/downloads/manual)"
        if name == "imagenet2012" else ""
    )
    return DataError(
        f"{problem}. Downloads are never attempted here. Ways out: (1) with network access, "
        f"prepare it: `tfds build {name} --file_format=array_record --data_dir=DIR` or "
        f"`tfds.builder({name!r}, data_dir=DIR, file_format='array_record').download_and_prepare()`"
        f"{manual}; (2) set TFDS_DATA_DIR (or the config's data_dir) to a directory that "
        "already holds the prepared dataset; (3) use local arrays instead: "
        "--config.data.dataset=npz:PATH with uint8 x_train, y_train, x_test, y_test."
    )


def cache_split(split: Split, num_threads: int) -> ArraySplit:
    """Decode a fixed-size split once into memory (CIFAR: ~180 MB), reading with grain threads."""
    from .engines import grain_batches

    count = len(split)
    first_image, _ = split.example(0)
    images = np.empty((count, *first_image.shape), np.uint8)
    labels = np.empty((count,), np.int32)
    chunk = 1024
    batches = grain_batches(split.example, np.arange(count), chunk, num_threads)
    for start, (chunk_images, chunk_labels) in zip(range(0, count, chunk), batches, strict=True):
        images[start:start + len(chunk_labels)] = chunk_images
        labels[start:start + len(chunk_labels)] = chunk_labels
    return ArraySplit(images, labels)
