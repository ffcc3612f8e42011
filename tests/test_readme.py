"""The README's Python API snippet runs as written (at a small width)."""

import os
import re

import jax
import numpy as np
from train_helpers import branchwise_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_api_snippet_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("width = 1.0", "width = 0.125")
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    scope = {"images": images}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    np.testing.assert_allclose(scope["deploy_logits"], scope["logits"], atol=1e-3)
    grown = {"params": scope["params"], "batch_stats": scope["stats"]}
    reference = branchwise_logits(scope["model"], grown, images)  # not the fused fast path
    np.testing.assert_allclose(scope["deploy_logits"], reference, atol=1e-3)
    assert scope["rep"].structure_of(scope["params"])["layer1_0.conv1.conv"]
    assert jax.tree_util.tree_leaves(scope["fused"])


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    lines = [x for x in open(os.path.join(ROOT, "README.md")).read().splitlines()
             if x.startswith("pip install")]
    assert lines[0].startswith("pip install -r requirements.txt && python -m dyrep_jax.main")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert lines[1] in ci
