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

_CHUNK = 4096


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per channel of uint8 NHWC images, on the 0..1 scale.

    Accumulates in float64 chunk by chunk so large arrays need no float copy.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot compute statistics of an empty image set")
    channels = images.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start:start + _CHUNK].reshape(-1, channels).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = images.size // channels
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.sqrt(var)
    std = np.where(std > 0, std, 255.0)  # constant channel: avoid dividing by zero
    return (mean / 255.0).astype(np.float32), (std / 255.0).astype(np.float32)
