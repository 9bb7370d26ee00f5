import os
import pathlib

# CPU only (an installed libtpu is used just for ahead-of-time TPU compiles), and eight simulated
# CPU devices for the sharding tests; set before anything imports jax (subprocesses inherit both).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def reference_dir() -> pathlib.Path:
    """The shared GLM-4 reference folder: $GLM_JAX_REFERENCE, else ../shared/glm4."""
    env = os.environ.get("GLM_JAX_REFERENCE")
    return pathlib.Path(env) if env else ROOT.parent / "shared" / "glm4"


@pytest.fixture(scope="session")
def reference() -> pathlib.Path:
    path = reference_dir()
    if not path.is_dir():
        pytest.fail(f"reference folder not found at {path}; set GLM_JAX_REFERENCE")
    return path
