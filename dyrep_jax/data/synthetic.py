"""Random images and labels from a fixed seed, for tests and loader benchmarks."""

import numpy as np

from .errors import DataError
from .source import ArraySplit, Source
from .stats import channel_stats

_DATA_SEED = 1234  # fixed: the data itself never depends on the run's seed
_FIELDS = ("H", "W", "C", "NUM_CLASSES", "N_TRAIN", "N_TEST")


def parse_synthetic_spec(spec: str) -> tuple[int, ...]:
    """'32,32,3,10,50000,10000' -> (H, W, C, NUM_CLASSES, N_TRAIN, N_TEST)."""
    parts = spec.split(",")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != len(_FIELDS) or min(values) < 1:
        raise DataError(
            f"bad synthetic spec {spec!r}: expected 'synthetic:{','.join(_FIELDS)}' "
            "with positive integers, e.g. synthetic:32,32,3,10,50000,10000"
        )
    return values


def load_synthetic_source(spec: str) -> Source:
    """Uniform random uint8 images and uniform random labels."""
    height, width, channels, num_classes, n_train, n_test = parse_synthetic_spec(spec)
    rng = np.random.default_rng(_DATA_SEED)
    shape = (height, width, channels)

    def split(count: int) -> ArraySplit:
        images = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=count, dtype=np.int32)
        return ArraySplit(images, labels)

    train, test = split(n_train), split(n_test)
    mean, std = channel_stats(train.images)
    return Source(f"synthetic:{spec}", train, test, num_classes, shape, mean, std)
