"""The TPU paged-attention wrappers (glm_jax/kernels/paged_tpu.py): the decode kernel in Pallas'
TPU interpreter and the ragged one's layout through JAX's reference implementation, on the pools
of tests/test_kernels.py, and both compiled for a TPU ahead of time (needs libtpu)."""

import importlib.util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.attention import normalized, ungroup
from glm_jax.kernels import decode_pallas, paged_tpu
from test_kernels import paged_case

POISON = 1e3   # these kernels read whole blocks and mask them by adding a finite value: finite garbage only


def tpu_case(page, int8, chunk=1):
    """`paged_case` in bf16 with finite garbage and every table entry a valid page (as they need)."""
    (q, lengths, k, v, table), scales, want = paged_case(page, int8, jnp.bfloat16, POISON, chunk)
    return (q, lengths, k, v, jnp.minimum(table, k.shape[1] - 1)), scales, want


@pytest.mark.parametrize("page, int8", [(16, False), (128, True)])
def test_tpu_paged_decode_in_interpreter(page, int8):
    """`tpu_paged_decode` in Pallas' TPU interpreter: the output against float64, and its running max
    and sum (what the sequence merge needs) as the GPU kernel's log-sum-exp."""
    args, scales, want = tpu_case(page, int8)
    state = jax.jit(lambda *a: paged_tpu.tpu_paged_decode(*a, interpret=True))(*args, *scales)
    np.testing.assert_allclose(np.asarray(ungroup(normalized(state), jnp.float32)), want, rtol=0, atol=2e-5)
    lse = decode_pallas.paged_decode(*args, *scales, interpret=True).lse
    np.testing.assert_allclose(np.asarray(state.lse), np.asarray(lse), rtol=1e-5, atol=1e-5)


def test_tpu_ragged_paged_layout():
    """`tpu_ragged_paged` through JAX's reference of the ragged kernel (same arguments): the pool's
    re-layout, chunks of 4 queries a row and their lengths as it takes them, zeros for a row of
    length 0."""
    args, _, want = tpu_case(16, False, chunk=4)
    state = paged_tpu.tpu_ragged_paged(*args, implementation="reference")
    np.testing.assert_allclose(np.asarray(ungroup(normalized(state), jnp.float32)), want, rtol=0, atol=2e-2)


@pytest.mark.xdist_group("libtpu")
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the [tpu] extra (libtpu)")
def test_tpu_wrappers_compile_for_tpu(monkeypatch):
    """Both wrappers lower and compile for a v5e chip ahead of time (GLM-4-9B's heads, small pool):
    decode on bf16 and int8 pools, the ragged kernel for decode and a prefill chunk."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")      # an AOT compile may share libtpu
    report = paged_tpu.tpu_kernel_report("v5e:1x1", batch=8, chunk=128, pool_pages=64, table_pages=16)
    assert [(f["name"], f["dtype"], f["compiled"]) for f in report] == [
        ("tpu_paged_decode", "bfloat16", True), ("tpu_paged_decode", "int8", True),
        ("tpu_ragged_paged", "bfloat16", True), ("tpu_ragged_paged", "bfloat16", True)], report
    assert all(f["argument_size_in_bytes"] > 2 * 64 * 128 * 128 for f in report)
