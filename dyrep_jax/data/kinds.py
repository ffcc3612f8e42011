"""Names of the augmentation recipes, where each one runs, and the host transform signature."""

from collections.abc import Callable

import numpy as np

DEVICE_AUGMENTS = ("none", "cifar")  # jittable, applied by augment_on_device after transfer
HOST_AUGMENTS = ("imagenet", "imagenet_strong")  # numpy/PIL, applied inside the train iterator
AUGMENTS = DEVICE_AUGMENTS + HOST_AUGMENTS

# (uint8 HWC image, per-example Generator or None for eval) -> uint8 HWC image
Transform = Callable[[np.ndarray, np.random.Generator | None], np.ndarray]
