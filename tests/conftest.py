import os
import pathlib

# CPU only (an installed libtpu is used just for ahead-of-time TPU compiles), and eight simulated
# CPU devices for the sharding tests; set before anything imports jax (subprocesses inherit both).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In-process `glm-jax generate` runs write no persistent compilation cache (tests/test_cli.py turns
# it on in subprocesses, in a temporary folder).
os.environ["GLM_JAX_COMPILE_CACHE"] = "off"
_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def reference_dir() -> pathlib.Path:
    """The GLM-4 reference data (tokenizer, published configs, fixtures): $GLM_JAX_REFERENCE, else
    the project's own copy in tests/data."""
    env = os.environ.get("GLM_JAX_REFERENCE")
    return pathlib.Path(env) if env else ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def reference() -> pathlib.Path:
    path = reference_dir()
    if not path.is_dir():
        pytest.fail(f"reference folder not found at {path}; set GLM_JAX_REFERENCE")
    return path
