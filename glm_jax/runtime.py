"""The process's JAX set-up for the command line: which platforms JAX starts, the compilation cache.

Importing this module imports no JAX; each function imports it when called.
"""

from __future__ import annotations

import os
import pathlib

from glm_jax.options import COMPILE_CACHE_ENV

# Device nodes of the accelerators JAX finds on its own: TPU (accel driver, vfio driver), NVIDIA, AMD, WSL2 GPUs.
ACCELERATOR_NODES = ("accel*", "vfio", "nvidia*", "kfd", "dxg")


def default_platforms(dev: pathlib.Path = pathlib.Path("/dev")) -> str | None:
    """JAX_PLATFORMS for a machine whose user set none: None (JAX chooses) where an accelerator's
    device node exists, else "cpu", so that an installed libtpu (the [tpu] extra, for TPU compiles
    on any machine) is not started: off a TPU VM that costs start-up time and prints errors."""
    return None if any(next(dev.glob(node), None) for node in ACCELERATOR_NODES) else "cpu"


def select_platforms() -> None:
    """Sets `default_platforms()` as JAX's platforms unless the user set JAX_PLATFORMS."""
    import jax

    if jax.config.jax_platforms is None and (platforms := default_platforms()):  # None: no JAX_PLATFORMS set
        jax.config.update("jax_platforms", platforms)


def compile_cache_dir(flag: str | None) -> pathlib.Path | None:
    """The persistent compilation cache folder: --compile-cache, else $GLM_JAX_COMPILE_CACHE, else
    $XDG_CACHE_HOME/glm-jax/jax (~/.cache/glm-jax/jax); None for "off". A folder that does not exist
    yet must be written as a path (with a "/" or "~"): a bare word such as "of" is refused (ValueError),
    being more likely a typo of "off" than a wish for a cache folder "./of"."""
    cache_home = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    source = "--compile-cache" if flag else f"${COMPILE_CACHE_ENV}"
    folder = flag or os.environ.get(COMPILE_CACHE_ENV) or str(cache_home / "glm-jax" / "jax")
    if folder == "off":
        return None
    path = pathlib.Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{source} {folder}: not a folder")
    if not path.exists() and os.sep not in folder and "/" not in folder and not folder.startswith("~"):
        raise ValueError(f"{source} {folder!r}: no such folder; write a new one as a path (./{folder}), "
                         f"or 'off' for no cache")
    return path


def use_compile_cache(folder: pathlib.Path | None) -> None:
    """JAX's persistent compilation cache in `folder` (None: none), for every program: the default
    threshold (1 s of compile time) would skip a small model's, so a second run would compile them again."""
    import jax

    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
