"""Every shipped config loads, validates, and names a model and dataset we know."""

import glob
import importlib.util
import os

import jax
import pytest

from dyrep_jax import models
from dyrep_jax.train import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_all_paper_configs_exist():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert {"quickstart", "cifar10_vgg16", "cifar100_vgg16", "cifar10_resnet18",
            "imagenet_resnet18", "imagenet_resnet50", "imagenet_mobilenet_v1",
            "imagenet_repvgg_a2", "imagenet_repvgg_b2g4"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_is_valid(path):
    config = load(path)
    validate_config(config)
    assert config.model.name in models.MODEL_NAMES
    model = models.create_model(config.model.name, num_classes=10, width=config.model.width)
    shape = (32, 32, 3)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, *shape)), train=False))
    assert models.count_params(abstract) > 0
