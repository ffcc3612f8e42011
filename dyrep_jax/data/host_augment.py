"""ImageNet-recipe augmentation on the host (numpy/PIL), one example at a time.

Every random draw comes from the `rng` passed in, which the pipeline derives from
(seed, epoch, example index), so a resumed epoch reproduces the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

from .kinds import HOST_AUGMENTS, Transform
from .randaugment import rand_augment, random_erasing

EVAL_RESIZE_RATIO = 256 / 224  # resize the shorter side to 256 for a 224 centre crop


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """A decoded PIL image passes through as is (streamed TFDS images arrive decoded)."""
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def num_channels(image: np.ndarray | Image.Image) -> int:
    return len(image.getbands()) if isinstance(image, Image.Image) else image.shape[-1]


def from_pil(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image, np.uint8)
    return array[..., None] if array.ndim == 2 and channels == 1 else array


def random_resized_crop(
    image: Image.Image,
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """Crop a random area fraction / aspect ratio, resize to size=(H, W) (Inception-style)."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            break
    else:  # fall back to the largest centred crop with an allowed aspect ratio
        crop_w, crop_h = width, height
        if width / height < ratio[0]:
            crop_h = round(width / ratio[0])
        elif width / height > ratio[1]:
            crop_w = round(height * ratio[1])
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return image.resize((size[1], size[0]), Image.BILINEAR, box=box)


def color_jitter(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast and saturation factors uniform in [1 - s, 1 + s], random order."""
    if strength <= 0:
        return image
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for which in rng.permutation(len(enhancers)):
        factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        image = enhancers[which](image).enhance(factor)
    return image


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Eval transform: shorter side to 256/224 of the crop size, then the centre crop."""
    width, height = image.size
    short = round(min(size) * EVAL_RESIZE_RATIO)
    scale = short / min(width, height)
    new_w, new_h = max(size[1], round(width * scale)), max(size[0], round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size[1]) // 2, (new_h - size[0]) // 2
    return image.crop((left, top, left + size[1], top + size[0]))


def make_train_transform(
    kind: str, size: tuple[int, int], color_jitter_strength: float, erasing_prob: float, mean, std
) -> Transform:
    """'imagenet': crop, flip, color jitter. 'imagenet_strong': crop, flip, RandAugment
    (the reference's 19 ops, m9, mstd 0.5 unclipped, 2 ops). Either one then erases a
    rectangle with per-pixel noise with probability `erasing_prob`. As in the DyRep reference,
    color jitter is used only when RandAugment is not."""
    if kind not in HOST_AUGMENTS:
        raise ValueError(f"unknown host augmentation {kind!r}; expected one of {HOST_AUGMENTS}")
    strong = kind == "imagenet_strong"

    def transform(image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        channels = num_channels(image)
        pil = random_resized_crop(to_pil(image), rng, size)
        if rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        if strong:
            pil = rand_augment(pil, rng)
        else:
            pil = color_jitter(pil, rng, color_jitter_strength)
        out = from_pil(pil, channels)
        if erasing_prob > 0:
            out = random_erasing(out, rng, mean, std, prob=erasing_prob)
        return out

    return transform


def make_eval_transform(size: tuple[int, int]) -> Transform:
    """Deterministic resize + centre crop (also used to bring variable-size images to size)."""

    def transform(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return from_pil(resize_center_crop(to_pil(image), size), num_channels(image))

    return transform
