"""Where af2-jax keeps what it makes for later runs: $AF2_JAX_HOME, and JAX's persistent compilation cache in it."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_dir() -> Path:
    """$AF2_JAX_HOME (default ~/.cache/af2_jax): the converted release (`infer --download`) and, in `xla/`, compiled
    programs."""
    return Path(os.environ.get("AF2_JAX_HOME", Path.home() / ".cache" / "af2_jax"))


# Set to 0 to keep af2-jax from turning JAX's persistent compilation cache on.
COMPILATION_CACHE_SWITCH = "AF2_JAX_COMPILATION_CACHE"


def use_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache in $AF2_JAX_HOME/xla, so a later process that compiles the same
    programs loads them from disk (on GPUs, over a minute per program for the release). A folder the user chose
    (JAX_COMPILATION_CACHE_DIR, or jax_compilation_cache_dir in jax.config) is kept, and
    AF2_JAX_COMPILATION_CACHE=0 leaves the cache as JAX has it. Returns the folder in use, or None."""
    chosen = jax.config.jax_compilation_cache_dir
    if chosen or os.environ.get(COMPILATION_CACHE_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return chosen or None
    folder = str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder
