"""Input pipelines: datasets -> deterministic, resumable, per-process uint8 batches.

`build_input` opens a dataset and returns an `InputPipeline`; `augment_on_device` /
`normalize_images` turn its uint8 batches into normalized float32 on the accelerator.
TFDS datasets need tensorflow-datasets and grain, imported only when such a dataset is used.
"""

from .device_augment import augment_on_device, normalize_images
from .errors import DataError
from .pipeline import InputPipeline, build_input

__all__ = ["DataError", "InputPipeline", "augment_on_device", "build_input", "normalize_images"]
