"""Model names -> constructors, default input shapes and default class counts."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax.numpy as jnp

from dyrep_jax.models.mobilenet import MobileNetV1
from dyrep_jax.models.repvgg import REPVGG_CONFIGS, RepVGG
from dyrep_jax.models.resnet import ResNet
from dyrep_jax.models.vgg import VGGCifar

CIFAR_INPUT = (32, 32, 3)
IMAGENET_INPUT = (224, 224, 3)


class ModelSpec(NamedTuple):
    build: Callable  # keyword arguments -> flax module
    input_shape: tuple
    num_classes: int


def _repvgg_spec(config) -> ModelSpec:
    build = partial(RepVGG, depths=config.depths, multipliers=config.multipliers,
                    groupwise=config.groups)
    return ModelSpec(build, IMAGENET_INPUT, 1000)


REGISTRY: dict[str, ModelSpec] = {
    "vgg16_cifar": ModelSpec(VGGCifar, CIFAR_INPUT, 10),
    "resnet18": ModelSpec(partial(ResNet, layers=(2, 2, 2, 2), block="basic"), IMAGENET_INPUT, 1000),
    "resnet34": ModelSpec(partial(ResNet, layers=(3, 4, 6, 3), block="basic"), IMAGENET_INPUT, 1000),
    "resnet50": ModelSpec(partial(ResNet, layers=(3, 4, 6, 3), block="bottleneck"),
                          IMAGENET_INPUT, 1000),
    "resnet101": ModelSpec(partial(ResNet, layers=(3, 4, 23, 3), block="bottleneck"),
                           IMAGENET_INPUT, 1000),
    "resnet18_cifar": ModelSpec(partial(ResNet, layers=(2, 2, 2, 2), block="basic",
                                        cifar_stem=True), CIFAR_INPUT, 10),
    "mobilenet_v1": ModelSpec(MobileNetV1, IMAGENET_INPUT, 1000),
    **{name: _repvgg_spec(config) for name, config in REPVGG_CONFIGS.items()},
}
MODEL_NAMES = tuple(REGISTRY)


def spec_of(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(MODEL_NAMES)}")
    return REGISTRY[name]


def create_model(name: str, num_classes: int | None = None, width: float = 1.0,
                 dtype=jnp.float32, with_bn_after_3x3: bool = True, deploy: bool = False,
                 bn_group_size: int = 0):
    """A flax module for `name`; `num_classes=None` takes the dataset default (10 or 1000).

    `width` multiplies every conv width; `dtype` is the compute dtype (params
    stay float32, logits come back float32); `with_bn_after_3x3=False` drops
    the BN after 3x3 slots (static DBB baseline); `deploy=True` builds the
    fused network that `fuse_network` variables run on; `bn_group_size=N`
    takes the network's BN batch statistics over groups of N images (0: the
    whole batch).
    """
    spec = spec_of(name)
    if num_classes is None:
        num_classes = spec.num_classes
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if int(bn_group_size) != bn_group_size or bn_group_size < 0:
        raise ValueError(f"bn_group_size must be an integer >= 0 (0 = whole batch), "
                         f"got {bn_group_size}")
    return spec.build(num_classes=int(num_classes), width=float(width), dtype=dtype,
                      with_bn_after_3x3=with_bn_after_3x3, deploy=deploy,
                      bn_group_size=int(bn_group_size))


def default_input_shape(name: str) -> tuple:
    """(H, W, C) the model was published at: 32x32x3 for CIFAR models, else 224x224x3."""
    return spec_of(name).input_shape
