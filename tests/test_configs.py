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


# The reference-recipe table of shared/design/dyrep-reference.md, value for value (plus the
# facts stated next to it: float32 everywhere, BN statistics per GPU = 32 images on
# ImageNet, BN recalibration every epoch in both RepVGG runs). Written out here, not
# imported from dyrep_jax/recipes.py, so that a recipe typo fails.
CIFAR = {
    "num_epochs": 600, "batch_size": 128, "optim.name": "sgd", "optim.lr": 0.1,
    "optim.momentum": 0.9, "optim.min_lr": 1e-6, "optim.warmup_epochs": 0,
    "optim.weight_decay": 1e-4, "optim.nesterov": False, "optim.decay_bn_and_bias": True,
    "optim.label_smoothing": 0.0, "data.augment": "cifar", "data.random_erasing": 0.0,
    "dyrep.adjust_interval": 15, "dyrep.max_adjust_epochs": 500,
    "dyrep.recal_bn_every_epoch": False, "model.dtype": "float32", "model.bn_group_size": 0,
}
IMAGENET = {
    "num_epochs": 120, "batch_size": 256, "optim.name": "sgd", "optim.lr": 0.1,
    "optim.momentum": 0.9, "optim.min_lr": 1e-7, "optim.warmup_epochs": 0,
    "optim.weight_decay": 1e-4, "optim.nesterov": True, "optim.decay_bn_and_bias": False,
    "optim.label_smoothing": 0.0, "data.dataset": "imagenet2012", "data.augment": "imagenet",
    "data.image_size": 224, "data.color_jitter": 0.06, "data.random_erasing": 0.0,
    "dyrep.adjust_interval": 5, "dyrep.max_adjust_epochs": 100,
    "dyrep.recal_bn_every_epoch": False, "model.dtype": "float32", "model.bn_group_size": 32,
}
REPVGG = {**IMAGENET, "data.color_jitter": 0.0, "dyrep.recal_bn_every_epoch": True}
RECIPE_TABLE = {
    "cifar10_vgg16": {**CIFAR, "model.name": "vgg16_cifar", "data.dataset": "cifar10"},
    "cifar100_vgg16": {**CIFAR, "model.name": "vgg16_cifar", "data.dataset": "cifar100"},
    "cifar10_resnet18": {**CIFAR, "model.name": "resnet18_cifar", "data.dataset": "cifar10"},
    "imagenet_resnet18": {**IMAGENET, "model.name": "resnet18"},
    "imagenet_resnet50": {**IMAGENET, "model.name": "resnet50"},
    "imagenet_mobilenet_v1": {**IMAGENET, "model.name": "mobilenet_v1", "num_epochs": 90,
                              "optim.weight_decay": 4e-5, "dyrep.max_adjust_epochs": 70},
    "imagenet_repvgg_a2": {**REPVGG, "model.name": "repvgg_a2"},
    "imagenet_repvgg_b2g4": {
        **REPVGG, "model.name": "repvgg_b2g4", "num_epochs": 200,
        "data.augment": "imagenet_strong", "optim.warmup_epochs": 5, "optim.warmup_lr": 1e-6,
        "optim.warmup_by_epoch": True, "data.random_erasing": 0.2,
        "optim.label_smoothing": 0.1,
    },
}


def field(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


@pytest.mark.parametrize("name", sorted(RECIPE_TABLE))
def test_paper_config_matches_the_reference_recipe(name):
    config = load(os.path.join(ROOT, "configs", f"{name}.py"))
    assert config.dyrep.mode == "dyrep"
    wrong = {key: (field(config, key), want) for key, want in RECIPE_TABLE[name].items()
             if field(config, key) != want  # (a bool must stay a bool: True == 1 in Python)
             or isinstance(field(config, key), bool) != isinstance(want, bool)}
    assert not wrong, f"{name}: (config, reference) differ: {wrong}"
def test_config_file_anywhere_on_disk_loads_as_main_loads_it(tmp_path):
    """`--config PATH` works for a file outside the repo (it imports dyrep_jax, not configs/)."""
    from absl import flags
    from ml_collections import config_flags

    path = tmp_path / "elsewhere" / "my_run.py"
    path.parent.mkdir()
    path.write_text(
        "from dyrep_jax.config_base import base_config\n\n\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.num_epochs = 7\n"
        "    return c\n")
    original = os.path.join(ROOT, "configs", "imagenet_repvgg_b2g4.py")
    shipped = tmp_path / "b2g4_copy.py"
    shipped.write_text(open(original).read())
    for file, epochs in ((path, 7), (shipped, load(original).num_epochs)):
        argv = ["prog", f"--config={file}", "--config.seed=3"]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                        lock_config=True, sys_argv=argv)
        fv(argv)
        validate_config(fv.config)
        assert (fv.config.num_epochs, fv.config.seed) == (epochs, 3)
