"""RandAugment and random erasing for the strong ImageNet recipe ('rand-m9-mstd0.5', reprob 0.2).

Written against PIL/numpy with an explicit numpy Generator so results are reproducible per
example. The op set is the DyRep reference's own 19 ops: timm's 15 (with the TPU posterize)
plus Distort, Zoom, Blur and Skew (warp_ops.py). Each of `num_ops` ops is drawn uniformly with
replacement and applied with probability 0.5 at a magnitude ~ N(9, 0.5), *not* clipped (so
levels above 10 occur, as in the reference).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from . import warp_ops
from .stats import IMAGENET_MEAN

MAX_LEVEL = 10.0
_FILL_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


def _fill(image: Image.Image):
    return _FILL_RGB if image.mode == "RGB" else _FILL_RGB[0]


_signed = warp_ops.signed


def _affine(image: Image.Image, matrix) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=_fill(image))


def _enhance(enhancer):
    return lambda image, level, rng: enhancer(image).enhance(level / MAX_LEVEL * 1.8 + 0.1)


def _rotate(image, level, rng):
    degrees = _signed(level / MAX_LEVEL * 30.0, rng)
    return image.rotate(degrees, Image.BICUBIC, fillcolor=_fill(image))


def _shear_x(image, level, rng):
    return _affine(image, (1, _signed(level / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0))


def _shear_y(image, level, rng):
    return _affine(image, (1, 0, 0, _signed(level / MAX_LEVEL * 0.3, rng), 1, 0))


def _translate_x(image, level, rng):
    pixels = _signed(level / MAX_LEVEL * 0.45, rng) * image.size[0]
    return _affine(image, (1, 0, pixels, 0, 1, 0))


def _translate_y(image, level, rng):
    pixels = _signed(level / MAX_LEVEL * 0.45, rng) * image.size[1]
    return _affine(image, (1, 0, 0, 0, 1, pixels))


def _posterize(image, level, rng):
    bits = int(level / MAX_LEVEL * 4)  # bits kept; 3-4 at magnitude 9
    if bits >= 8:
        return image
    if bits <= 0:  # keeping no bit leaves black (PIL refuses bits=0 itself)
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits)


def _solarize(image, level, rng):
    return ImageOps.solarize(image, int(level / MAX_LEVEL * 256))


def _solarize_add(image, level, rng):
    add = int(level / MAX_LEVEL * 110)
    table = [min(255, v + add) if v < 128 else v for v in range(256)]
    return image.point(table * len(image.getbands()))


RAND_OPS = {  # the reference's order
    "Distort": warp_ops.distort,
    "Zoom": warp_ops.zoom,
    "Blur": warp_ops.blur,
    "Skew": warp_ops.skew,
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Rotate": _rotate,
    "PosterizeTpu": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
_OP_NAMES = tuple(RAND_OPS)


def rand_augment(
    image: Image.Image,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
) -> Image.Image:
    """Apply `num_ops` randomly chosen ops (with replacement), each with probability `prob`,
    at a magnitude drawn from N(magnitude, magnitude_std) and left unclipped."""
    for choice in rng.integers(0, len(_OP_NAMES), size=num_ops):
        if rng.random() >= prob:
            continue
        level = float(rng.normal(magnitude, magnitude_std)) if magnitude_std > 0 else magnitude
        image = RAND_OPS[_OP_NAMES[choice]](image, level, rng)
    return image


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    mean,
    std,
    prob: float = 0.2,
    area: tuple[float, float] = (0.02, 1 / 3),
    min_aspect: float = 0.3,
) -> np.ndarray:
    """With probability `prob`, fill one random rectangle with per-pixel random values.

    The reference erases after normalization with N(0, 1) noise ('pixel' mode); on uint8 pixels
    the equivalent is (mean + std * N(0, 1)) * 255, except that values beyond 0..255 are
    clipped (images stay uint8 until the device).
    """
    if rng.random() >= prob:
        return image
    height, width, channels = image.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(*area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        box_h = round(math.sqrt(target_area * aspect))
        box_w = round(math.sqrt(target_area / aspect))
        if 0 < box_h < height and 0 < box_w < width:
            top = int(rng.integers(0, height - box_h + 1))
            left = int(rng.integers(0, width - box_w + 1))
            noise = rng.standard_normal((box_h, box_w, channels))
            pixels = (np.asarray(mean) + np.asarray(std) * noise) * 255.0
            image = image.copy()
            image[top:top + box_h, left:left + box_w] = np.clip(np.rint(pixels), 0, 255)
            return image
    return image
