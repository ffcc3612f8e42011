"""Local arrays in one .npz file: the offline way to train on any dataset (e.g. exported CIFAR)."""

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError
from .source import ArraySplit, Source
from .stats import channel_stats

_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz_source(path: str) -> Source:
    """Read and validate `x_train, y_train, x_test, y_test` (uint8 NHWC images, integer labels).

    Mean/std come from the train images (see stats.py); num_classes is max label + 1.
    """
    arrays = _read_arrays(path)
    train = _make_split(path, arrays, "train")
    test = _make_split(path, arrays, "test")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{path}: x_train images are {train.images.shape[1:]} but x_test images are "
            f"{test.images.shape[1:]}; both splits need the same (H, W, C)"
        )
    if len(train) == 0:
        raise DataError(f"{path}: x_train holds no examples")
    num_classes = int(max(train.labels.max(initial=0), test.labels.max(initial=0))) + 1
    mean, std = channel_stats(train.images)
    shape = tuple(int(d) for d in train.images.shape[1:])
    return Source(f"npz:{path}", train, test, num_classes, shape, mean, std)


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise DataError(f"npz file {path!r} does not exist (expected keys {', '.join(_KEYS)})")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("holds a single array, not named arrays")
        with archive:
            found = sorted(archive.files)
            arrays = {key: archive[key] for key in _KEYS if key in found}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz archive ({err})") from err
    missing = [key for key in _KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing key {missing[0]!r} (found {found}); expected "
            "uint8 x_train/x_test [N, H, W, C] and integer y_train/y_test [N]"
        )
    return arrays


def _make_split(path: str, arrays: dict[str, np.ndarray], split: str) -> ArraySplit:
    x_key, y_key = f"x_{split}", f"y_{split}"
    images, labels = arrays[x_key], arrays[y_key]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: key {x_key!r} has dtype {images.dtype}; expected uint8 pixels")
    if images.ndim != 4:
        raise DataError(
            f"{path}: key {x_key!r} has shape {images.shape}; expected rank 4 [N, H, W, C]"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras-style [N, 1] labels
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: key {y_key!r} has shape {labels.shape} and dtype {labels.dtype}; "
            "expected integer labels of shape [N]"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{path}: key {y_key!r} has {labels.shape[0]} labels but {x_key!r} has "
            f"{images.shape[0]} images; expected one label per image"
        )
    return ArraySplit(np.ascontiguousarray(images), labels.astype(np.int32))
