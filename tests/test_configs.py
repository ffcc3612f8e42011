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
