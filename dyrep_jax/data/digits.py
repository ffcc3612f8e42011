"""scikit-learn's bundled 8x8 digits, upsampled to 16x16: a tiny offline dataset for smoke runs."""

import numpy as np

from .source import ArraySplit, Source
from .stats import channel_stats

NUM_TRAIN = 1437  # of 1797; the remaining 360 form the test split
_SPLIT_SEED = 0  # fixed so the split never changes between runs
_SIZE = 16


def load_digits_source() -> Source:
    """Digits as uint8 16x16x1 images with a fixed 1437/360 train/test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float64) * (255.0 / 16.0)
    images = bilinear_resize(images, _SIZE, _SIZE)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(_SPLIT_SEED).permutation(labels.shape[0])
    train_idx, test_idx = order[:NUM_TRAIN], order[NUM_TRAIN:]
    train = ArraySplit(images[train_idx], labels[train_idx])
    test = ArraySplit(images[test_idx], labels[test_idx])
    mean, std = channel_stats(train.images)
    return Source("digits", train, test, 10, (_SIZE, _SIZE, 1), mean, std)


def bilinear_resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of [N, h, w] float images with half-pixel centres (like PIL / jax.image)."""
    rows = _interpolation_matrix(images.shape[1], height)
    cols = _interpolation_matrix(images.shape[2], width)
    return np.einsum("yh,nhw,xw->nyx", rows, images, cols)


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of linear interpolation, edges clamped."""
    centres = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centres - low
    weights = np.zeros((size_out, size_in))
    weights[np.arange(size_out), low] += 1 - frac
    weights[np.arange(size_out), high] += frac
    return weights
