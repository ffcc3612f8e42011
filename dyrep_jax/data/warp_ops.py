"""The four RandAugment ops the DyRep reference adds to timm's set: Distort, Zoom, Blur, Skew.

Facts from the reference (`rand-m9-mstd0.5` on RepVGG-B2g4), written in our own words. Each op
takes a PIL image, a magnitude `level` (0..10 nominal, may exceed it: not clipped) and the
example's Generator (for the sign of signed ops). All keep the image size and mode.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

MAX_LEVEL = 10.0


def signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def distort(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """Grid warp: tiles = int(shift / 10) per side, with shift = int(level + 10) pixels; every
    interior grid vertex is moved by (shift, shift). Below level 10 the grid is one tile, so
    only the bicubic resampling of an identity mesh is left, as in the reference."""
    shift = int(level / MAX_LEVEL * 10 + 10)
    tiles = max(1, int(0.1 * shift))
    width, height = image.size
    xs = [col * (width // tiles) for col in range(tiles)] + [width]
    ys = [row * (height // tiles) for row in range(tiles)] + [height]

    def vertex(col: int, row: int) -> tuple[int, int]:
        inner = 0 < col < tiles and 0 < row < tiles
        return (xs[col] + shift, ys[row] + shift) if inner else (xs[col], ys[row])

    mesh = []
    for row in range(tiles):
        for col in range(tiles):
            box = (xs[col], ys[row], xs[col + 1], ys[row + 1])
            corners = (vertex(col, row), vertex(col, row + 1),  # PIL quad order: TL, BL, BR, TR
                       vertex(col + 1, row + 1), vertex(col + 1, row))
            mesh.append((box, tuple(v for corner in corners for v in corner)))
    return image.transform(image.size, Image.MESH, mesh, Image.BICUBIC)


def zoom(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """Scale by level/10 * 0.4 (a zoom *out* at m9: 0.36) and take the centred window of the
    original size; the area outside the shrunken image is black."""
    factor = level / MAX_LEVEL * 0.4
    width, height = image.size
    small = image.resize(
        (max(1, round(width * factor)), max(1, round(height * factor))), Image.BICUBIC
    )
    centre_x, centre_y = small.size[0] / 2, small.size[1] / 2
    return small.crop((
        math.floor(centre_x - width / 2), math.floor(centre_y - height / 2),
        math.floor(centre_x + width / 2), math.floor(centre_y + height / 2),
    ))


def blur(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with radius +-level/10 * 0.5 (PIL's behaviour for a negative radius)."""
    return image.filter(ImageFilter.GaussianBlur(signed(level / MAX_LEVEL * 0.5, rng)))


def skew_coefficients(width: int, height: int, shift: int) -> np.ndarray:
    """PIL PERSPECTIVE coefficients that send the output quad (each corner pushed `shift`
    pixels outward along one axis, clockwise) onto the input image's corners."""
    image_corners = [(0, 0), (width, 0), (width, height), (0, height)]
    pushed = [(-shift, 0), (width, -shift), (width + shift, height), (0, height + shift)]
    rows, targets = [], []
    for (x, y), (u, v) in zip(pushed, image_corners, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        targets += [u, v]
    return np.linalg.solve(np.asarray(rows, np.float64), np.asarray(targets, np.float64))


def skew(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """Perspective skew by ceil(max(W, H) * (+-level/10 * 0.3)) pixels, bicubic."""
    width, height = image.size
    shift = math.ceil(max(width, height) * signed(level / MAX_LEVEL * 0.3, rng))
    coefficients = skew_coefficients(width, height, shift)
    return image.transform(image.size, Image.PERSPECTIVE, tuple(coefficients), Image.BICUBIC)
