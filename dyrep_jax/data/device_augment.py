"""CIFAR-recipe augmentation and normalization as jittable JAX, run on the accelerator.

Images travel host->device as uint8 (4x less transfer than float32); every random choice
(crop offset, flip, cutout centre) is drawn separately for each example.
"""

import jax
import jax.numpy as jnp

from .kinds import DEVICE_AUGMENTS


def normalize_images(images, mean, std) -> jax.Array:
    """uint8 NHWC -> float32 ((x / 255 - mean) / std), per channel."""
    pixels = jnp.asarray(images).astype(jnp.float32) / 255.0
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (pixels - mean) / std


def augment_on_device(
    rng, images, mean, std, kind: str = "cifar", *, padding: int = 4, cutout_size: int = 16
) -> jax.Array:
    """Train-time augmentation + normalization of a uint8 NHWC batch -> float32 NHWC.

    kind 'cifar' (DyRep reference recipe): random crop back to the input size after zero
    padding by `padding` pixels, random horizontal flip, normalization, then Cutout: one
    `cutout_size` square per image with its centre uniform over the image, clipped at the
    borders, set to 0 in the normalized tensor. kind 'none': normalization only.
    `kind`, `padding` and `cutout_size` are static (mark them so under jax.jit).
    """
    if kind == "none":
        return normalize_images(images, mean, std)
    if kind != "cifar":
        raise ValueError(f"unknown device augmentation {kind!r}; expected one of {DEVICE_AUGMENTS}")
    images = jnp.asarray(images)
    count, height, width, _ = images.shape
    # One draw for everything (fewer RNG kernels = faster compiles); a column per example.
    limits = jnp.array([2 * padding + 1, 2 * padding + 1, 2, height, width])
    tops, lefts, flips, centre_ys, centre_xs = jax.random.randint(rng, (5, count), 0, limits[:, None])
    images = _crop_and_flip(images, tops, lefts, flips.astype(bool), padding)
    keep = _cutout_keep_mask(centre_ys, centre_xs, height, width, cutout_size)
    return normalize_images(images, mean, std) * keep[..., None]


def _crop_and_flip(images, tops, lefts, flips, padding: int):
    """Per-example crop of the zero-padded batch back to the input size, then optional flip."""
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop(image, top, left):
        return jax.lax.dynamic_slice(image, (top, left, 0), (height, width, channels))

    crops = jax.vmap(crop)(padded, tops, lefts)
    return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def _cutout_keep_mask(centre_ys, centre_xs, height: int, width: int, size: int):
    """float32 [N, H, W]: 0 on rows [cy - size//2, cy + size//2) x same for columns, else 1."""
    half = size // 2
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= centre_ys[:, None] - half) & (rows < centre_ys[:, None] + half)
    in_cols = (cols >= centre_xs[:, None] - half) & (cols < centre_xs[:, None] + half)
    return 1.0 - (in_rows[:, :, None] & in_cols[:, None, :]).astype(jnp.float32)
