"""The process's JAX set-up: which platforms JAX starts (for the command line and the library), the
compilation cache and a count of the programs compiled; how to install an extra.

Importing this module imports no JAX; each function imports it when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shlex
import sys
import time

from glm_jax.options import COMPILE_CACHE_ENV

# Device nodes of the accelerators JAX finds on its own: TPU (accel driver, vfio driver), NVIDIA, AMD, WSL2 GPUs.
ACCELERATOR_NODES = ("accel*", "vfio", "nvidia*", "kfd", "dxg")


def default_platforms(dev: pathlib.Path = pathlib.Path("/dev")) -> str | None:
    """JAX_PLATFORMS for a machine whose user set none: None (JAX chooses) where an accelerator's
    device node exists, else "cpu", so that an installed libtpu (the [tpu] extra, for TPU compiles
    on any machine) is not started: off a TPU VM that costs start-up time and prints errors."""
    return None if any(next(dev.glob(node), None) for node in ACCELERATOR_NODES) else "cpu"


def select_platforms() -> None:
    """Sets `default_platforms()` as JAX's platforms unless the user set JAX_PLATFORMS (or
    jax_platforms) or JAX has already started its backends."""
    import jax

    if jax.config.jax_platforms is None and not _backends_started() and (platforms := default_platforms()):
        jax.config.update("jax_platforms", platforms)


def _backends_started() -> bool:
    """Whether JAX has started its backends (JAX has no public query; unknown counts as started)."""
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "backends_are_initialized", lambda: True)())
    except ImportError:
        return True


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


@dataclasses.dataclass
class Compiles:
    """What a `count_compiles()` block compiled: programs, the seconds they took, how many of them
    the persistent compilation cache served, and its folder (None: off)."""
    programs: int = 0
    from_cache: int = 0
    seconds: float = 0.0
    cache_dir: str | None = None

    def format(self) -> str:
        cache = ("persistent compilation cache off" if self.cache_dir is None else
                 f"{self.from_cache} of them from the persistent compilation cache {self.cache_dir}")
        return f"{self.programs} programs in {self.seconds:.1f} s ({cache})"


@contextlib.contextmanager
def count_compiles():
    """Counts the programs JAX compiles (or loads from its persistent cache) inside the block."""
    import jax

    count = Compiles(cache_dir=jax.config.jax_compilation_cache_dir or None)

    def on_duration(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            count.programs += 1

    def on_event(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            count.from_cache += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    start = time.perf_counter()
    try:
        yield count
    finally:
        count.seconds = time.perf_counter() - start
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)


def install_command(extra: str) -> str:
    """The command that installs the package's `extra` into this Python: from the clone this
    package runs from (an editable install), else from a clone of glm-jax."""
    clone = pathlib.Path(__file__).resolve().parents[1]
    source = shlex.quote(f"{clone}[{extra}]") if (clone / "setup.cfg").is_file() else f"'<glm-jax clone>[{extra}]'"
    return f"{shlex.quote(sys.executable)} -m pip install -e {source}"
