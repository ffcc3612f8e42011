"""JAX's persistent compilation cache: on by default, at a per-user cache path.

Every structure change compiles new programs; the on-disk cache makes reruns, resumes
and repeated structures cheap. `config.compilation_cache_dir` picks the folder:
"auto" (the default) keeps JAX's own setting (JAX_COMPILATION_CACHE_DIR) when there is
one, else uses $XDG_CACHE_HOME/dyrep_jax/jax_cache (~/.cache/... without XDG_CACHE_HOME);
"" turns the cache off; anything else is the folder to use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger("dyrep_jax")

AUTO = "auto"
MIN_COMPILE_SECONDS = 0.0  # cache every program: CPU ones often compile in under JAX's 1 s


def user_cache_dir(environ: Mapping[str, str] = os.environ) -> str:
    """$XDG_CACHE_HOME/dyrep_jax/jax_cache, else ~/.cache/dyrep_jax/jax_cache."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dyrep_jax", "jax_cache")


def resolve_cache_dir(setting: str, environ: Mapping[str, str] = os.environ,
                      jax_setting: str | None = None) -> str | None:
    """The cache folder for `config.compilation_cache_dir` = `setting`; None = off."""
    if setting == "":
        return None
    if setting == AUTO:
        return jax_setting or user_cache_dir(environ)
    return os.path.expanduser(setting)


def use_persistent_cache(setting: str) -> str | None:
    """Configure JAX's persistent cache for this process; returns the folder (None = off).

    Call before the first compile: JAX opens the cache once per process.
    """
    path = resolve_cache_dir(setting, jax_setting=jax.config.jax_compilation_cache_dir)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("persistent compilation cache: off")
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    log.info("persistent compilation cache: %s", path)
    return path
