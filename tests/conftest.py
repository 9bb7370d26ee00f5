import functools
import json
import os
import pathlib
import shutil
import tempfile

# CPU only (an installed libtpu is used just for ahead-of-time TPU compiles), and eight simulated
# CPU devices for the sharding tests; set before anything imports jax (subprocesses inherit both).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the two test workers (and subprocesses) may each compile for TPU at once: without this libtpu's
# lockfile refuses the second ("Internal error when accessing libtpu multi-process lockfile")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# In-process `glm-jax generate` runs write no persistent compilation cache of their own (tests/test_cli.py
# turns it on in subprocesses, in a temporary folder).
os.environ["GLM_JAX_COMPILE_CACHE"] = "off"
# One persistent compilation cache for the whole session, shared by both workers and every subprocess
# (JAX reads these variables as its settings' defaults): many tests compile the same small model's
# programs, and a clean checkout starts it empty. Made by the first process (the controller, before
# the workers start; they inherit it), removed by it at the end. Its size bound turns on JAX's file
# lock, so two processes never read an entry half written. GLM_JAX_TEST_COMPILE_CACHE=off: none.
if os.environ.get("GLM_JAX_TEST_COMPILE_CACHE") != "off" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["GLM_JAX_TEST_COMPILE_CACHE_OWNER"] = str(os.getpid())
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="glm-jax-test-compile-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# The tests' programs are small and compiled once or twice each: LLVM's optimisation passes cost
# more than they save (the suite runs ~1.4x faster without them). XLA's own graph passes, which decide
# what is computed and in which precision, run as always.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

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


@functools.cache
def glm4_tokenizer():
    """The real GLM-4 vocabulary, loaded once per session."""
    from glm_jax.tokenizer import Tokenizer

    return Tokenizer.from_file(reference_dir() / "tokenizer.model")


@functools.cache
def golden_cases(kind: str) -> list[dict]:
    """The tokenizer cases of one kind (text, chat, ...) with the original tokenizer's ids."""
    lines = (reference_dir() / "tokenizer_cases.jsonl").read_text(encoding="utf-8").splitlines()
    return [case for case in map(json.loads, lines) if case["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_chat_model(reference, tmp_path_factory):
    """A tiny random GLM-4 with the real vocabulary, tokenizer and generation config (converted from
    a Hugging Face folder)."""
    from glm_jax.convert.checkpoint import convert
    from glm_jax.testing import random_config, write_random_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    config = random_config(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                           head_dim=8)
    write_random_checkpoint(root / "hf", config, reference=reference)
    convert(root / "hf", root / "model", progress=False)
    return root / "model"


def random_glm(folder, *, heads, kv_heads, rope_theta, head_dim=16, hidden=64, layers=2, seed=0):
    """transformers' GlmForCausalLM (eval mode) of a random `glm`-layout folder written at `folder`
    (vocabulary 300): glm_jax.load(folder) has the same weights."""
    import transformers

    from glm_jax.config import GLMConfig
    from glm_jax.testing import write_random_checkpoint

    config = GLMConfig(vocab_size=300, hidden_size=hidden, intermediate_size=96, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=rope_theta, max_seq_len=8192,
                       eos_token_ids=(1,), pad_token_id=None, dtype="float32")
    # every weight random (std 0.08), norms around 1, so no term can hide
    write_random_checkpoint(folder, config, layout="glm", seed=seed, std=0.08, force=True)
    return transformers.GlmForCausalLM.from_pretrained(folder).eval()


def pytest_unconfigure(config):
    """The process that made the session's compilation cache removes it."""
    if os.environ.get("GLM_JAX_TEST_COMPILE_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
