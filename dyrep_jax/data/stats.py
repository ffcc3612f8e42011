"""Per-channel normalization statistics (0..1 pixel scale).

Named datasets use the constants of the DyRep reference recipes. Local arrays (digits,
npz, synthetic) get statistics computed from their full train split, so any dataset is
normalized to roughly zero mean / unit variance; for the real CIFAR-10 train set this
reproduces the CIFAR constants below to about 1e-4.
"""

import numpy as np

CIFAR_MEAN = np.array((0.4914, 0.4822, 0.4465), np.float32)
CIFAR_STD = np.array((0.2470, 0.2435, 0.2616), np.float32)
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)

_CHUNK = 8192  # images per histogram pass; bounds the temporary int arrays


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per channel of uint8 NHWC images, on the 0..1 scale.

    Exact: built from per-channel 256-bin histograms, chunk by chunk, so large arrays
    need no float copy.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot compute statistics of an empty image set")
    channels = images.shape[-1]
    counts = np.zeros((channels, 256), np.int64)
    for start in range(0, images.shape[0], _CHUNK):
        pixels = images[start:start + _CHUNK].reshape(-1, channels)
        for channel in range(channels):
            counts[channel] += np.bincount(pixels[:, channel], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    var = np.maximum(counts @ np.square(values) / total - np.square(mean), 0.0)
    std = np.sqrt(var)
    std = np.where(std > 0, std, 1.0)  # constant channel: avoid dividing by zero
    return mean.astype(np.float32), std.astype(np.float32)
