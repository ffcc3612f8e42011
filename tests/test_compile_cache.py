"""Where the persistent compilation cache goes for each `compilation_cache_dir` setting."""

import os

import jax

from dyrep_jax.compile_cache import resolve_cache_dir, use_persistent_cache, user_cache_dir
from dyrep_jax.config_base import base_config


def test_auto_is_the_default_and_resolves_to_the_user_cache():
    assert base_config().compilation_cache_dir == "auto"
    env = {"XDG_CACHE_HOME": "/x/cache"}
    assert resolve_cache_dir("auto", env) == "/x/cache/dyrep_jax/jax_cache"
    home = os.path.join(os.path.expanduser("~"), ".cache", "dyrep_jax", "jax_cache")
    assert user_cache_dir({}) == home and resolve_cache_dir("auto", {}) == home
    assert resolve_cache_dir("auto", {"XDG_CACHE_HOME": ""}) == home


def test_auto_keeps_jax_own_setting_empty_is_off_and_a_path_is_used():
    assert resolve_cache_dir("auto", {}, jax_setting="/j/cache") == "/j/cache"
    assert resolve_cache_dir("", {"XDG_CACHE_HOME": "/x"}, jax_setting="/j") is None
    assert resolve_cache_dir("~/c", {}) == os.path.expanduser("~/c")


def test_use_persistent_cache_caches_every_program_and_off_disables_it():
    before = {name: getattr(jax.config, name) for name in (
        "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")}
    try:
        # the test session's cache (conftest.py) is JAX's setting, so "auto" keeps it
        assert use_persistent_cache("auto") == jax.config.jax_compilation_cache_dir
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert use_persistent_cache("") is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
