"""pyproject.toml, the requirement files and the lock file agree with each other and the code."""

import importlib
import os
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dyrep_jax

tomllib = pytest.importorskip("tomllib")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def requirement_file(name):
    """{canonical name: specifier} of a requirements file, without its `-r` includes."""
    with open(os.path.join(ROOT, name)) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    reqs = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def as_map(specs, skip_self=True):
    reqs = [Requirement(s) for s in specs]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs
            if not (skip_self and canonicalize_name(r.name) == "dyrep-jax")}


def test_requirement_files_mirror_pyproject():
    p = project()["project"]
    extras = p["optional-dependencies"]
    assert requirement_file("requirements.txt") == {
        **as_map(p["dependencies"]), **as_map(extras["tfds"])}
    assert requirement_file("requirements-dev.txt") == as_map(extras["dev"])
    assert requirement_file("requirements-interop.txt") == as_map(extras["interop"])


def test_lock_pins_every_requirement_within_its_floor():
    p = project()["project"]
    extras = p["optional-dependencies"]
    wanted = [Requirement(s) for s in p["dependencies"] + sum(extras.values(), [])]
    lock = {}
    for line in open(os.path.join(ROOT, "requirements-lock.txt")):
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            lock[canonicalize_name(match[1])] = match[2]
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "dyrep-jax":
            continue
        assert name in lock, f"{req.name} missing from requirements-lock.txt"
        assert req.specifier.contains(lock[name], prereleases=True), (req, lock[name])


def test_console_script_and_version():
    p = project()
    module, func = p["project"]["scripts"]["dyrep-jax"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert p["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dyrep_jax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", dyrep_jax.__version__)
    assert p["tool"]["setuptools"]["packages"]["find"]["include"] == ["dyrep_jax*"]
