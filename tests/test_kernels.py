"""The GPU kernels (glm_jax/kernels/): the paged Pallas decode kernel in Pallas' interpreter, the
cuDNN chunk's decomposition through jax.nn's XLA path (alone and on a row's gathered pages, as
`gpu_prefill` runs it), the decode kernel's lowering for CUDA without a GPU, and the engine's
"gpu" kernel itself on a GPU (skipped without one)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from glm_jax.attention import PAD, normalized, ungroup
from glm_jax.engine.cache import cache_ops, quantize
from glm_jax.engine.paged_attention import gpu_prefill
from glm_jax.kernels import decode_pallas
from glm_jax.kernels.cudnn import cudnn_chunk
from glm_jax.sharding import Layout, make_mesh

B, HQ, G, D = 2, 8, 2, 16
GPU = [d for d in jax.devices() if d.platform == "gpu"]   # tests/conftest.py keeps JAX on CPUs unless JAX_PLATFORMS says
on_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU (run with JAX_PLATFORMS=cuda)")


def reference(q, k, v, q_index, k_index):
    """float64 attention: q [b,C,Hq,D], k/v [b,S,G,D] in slot order, causal by index."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
    s = np.einsum("bchd,bshd->bhcs", q, k) / np.sqrt(q.shape[-1])
    mask = (k_index[:, None, None, :] <= q_index[:, None, :, None]) & (k_index[:, None, None, :] != PAD)
    s = np.where(mask, s, -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(top == -np.inf, 0.0, top))
    total = p.sum(-1, keepdims=True)
    return np.einsum("bhcs,bshd->bchd", p / np.where(total == 0, 1.0, total), v)   # seeing nothing: zeros


def chunk_case(start, s=512, chunk=64, dtype=np.float32):
    rng = np.random.default_rng(start)
    k, v = (rng.standard_normal((B, s, G, D)).astype(dtype) for _ in range(2))
    q = rng.standard_normal((B, chunk, HQ, D)).astype(dtype)
    index = np.full((B, s), PAD, np.int32)
    index[:, :start + chunk] = np.arange(start + chunk)
    qi = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (B, chunk))
    return q, k, v, qi, index


@pytest.mark.parametrize("start", [0, 96, 200])
def test_fused_chunk_decomposition(start):
    """The cuDNN chunk's decomposition (the chunk's causal self-attention + its attention to slots
    [0, start), merged by log-sum-exp), run through jax.nn's XLA implementation."""
    q, k, v, qi, index = chunk_case(start)
    state = jax.jit(cudnn_chunk, static_argnums=4)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), start, "xla")
    got = ungroup(normalized(state), jnp.float32)
    np.testing.assert_allclose(np.asarray(got), reference(q, k, v, qi, index), rtol=0, atol=2e-5)


def paged_case(page, int8, dtype=np.float32, poison=np.nan, chunk=1):
    """A pool of pages and four rows over it: lengths 0, part of a page, several pages (the first
    three shared with the next row) and the whole table, page ids shuffled. Slots no row sees are
    `poison` (K/V, or an int8 pool's scales), and so is the last page, where unused table entries
    (out of range: the interpreter clamps them there) would lead if read. Returns the kernel's
    arguments, the scales and the float64 answer [b,chunk,Hq,D]: a row's chunk queries see the
    last chunk of its slots causally (lengths [b, chunk])."""
    rng = np.random.default_rng(page)
    m_pages = max(3, 384 // page)
    lengths = np.array([0, page // 2 + 3, 3 * page - 5, m_pages * page], np.int32)
    pool = 2 * m_pages + 4
    ids = rng.permutation(pool - 1)
    table = np.full((4, m_pages), pool + 7, np.int32)
    table[1, :1] = ids[:1]
    table[3] = ids[1:1 + m_pages]
    table[2, :3] = table[3, :3]                                    # a shared prefix of three full pages
    k, v = (rng.standard_normal((G, pool, page, D)).astype(np.float32) for _ in range(2))
    seen = np.zeros((pool, page), bool)
    for row, length in enumerate(lengths):
        slot = np.arange(length)
        seen[table[row, slot // page], slot % page] = True
    if int8:
        (k, k_scale), (v, v_scale) = (tuple(np.array(a) for a in quantize(jnp.asarray(x))) for x in (k, v))
        k_val, v_val = k * k_scale[..., None], v * v_scale[..., None]
        poisoned = [k_scale, v_scale]
    else:
        k, v = k.astype(dtype), v.astype(dtype)
        k_val, v_val = k.astype(np.float32), v.astype(np.float32)
        poisoned = [k, v]
    for x in poisoned:
        x[:, ~seen] = poison
    q = rng.standard_normal((4, chunk, HQ, D)).astype(dtype)
    q_index = np.maximum(lengths[:, None] - chunk + np.arange(chunk), -1)
    pages = np.minimum(table, pool - 1)
    mask = seen[pages].reshape(4, -1)                              # [b, M*page]
    k_rows, v_rows = (np.where(mask[..., None, None], x[:, pages].reshape(G, 4, -1, D).transpose(1, 2, 0, 3), 0.0)
                      for x in (k_val, v_val))                     # [b, M*page, G, D] in slot order
    index = np.where(mask, np.arange(mask.shape[1]), PAD)
    want = reference(q.astype(np.float32), k_rows, v_rows, q_index, index)
    args = (jnp.asarray(q), jnp.asarray(q_index + 1), jnp.asarray(k), jnp.asarray(v), jnp.asarray(table))
    return args, tuple(jnp.asarray(x) for x in poisoned) if int8 else (), want


@pytest.mark.parametrize("page, int8", [(16, False), (16, True), (128, False), (128, True), (256, False)])
def test_paged_decode_reads_each_row_through_its_table(page, int8):
    """`paged_decode` in Pallas' interpreter: each row sees the first lengths[i] slots of its pages,
    in table order (shared and shuffled page ids, a length of 0, a partial page, the whole
    table; 256-slot pages in 128-slot tiles), nothing else; against float64 (int8: on the
    dequantized values)."""
    args, scales, want = paged_case(page, int8)
    run = jax.jit(lambda *a: ungroup(normalized(decode_pallas.paged_decode(*a, interpret=True)), jnp.float32))
    got = run(*args, *scales)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("page, int8", [(16, False), (256, True)])
def test_paged_decode_lowers_for_cuda(page, int8):
    """`paged_decode` compiles to a Triton call for CUDA (exported here, without a GPU) on bf16 and
    int8 pools, pages of 16 slots and of 256 (read in 128-slot tiles)."""
    q = jax.ShapeDtypeStruct((8, 1, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 64, page, 128), jnp.int8 if int8 else jnp.bfloat16)
    scales = (jax.ShapeDtypeStruct(kv.shape[:-1], jnp.float32),) * 2 if int8 else ()
    lengths, table = jax.ShapeDtypeStruct((8, 1), jnp.int32), jax.ShapeDtypeStruct((8, 16), jnp.int32)
    exported = export.export(jax.jit(decode_pallas.paged_decode), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, lengths, kv, kv, table, *scales)
    text = exported.mlir_module()
    assert "__gpu$xla.gpu.triton" in text and 'name = "paged_decode"' in text


POISON = 1e3   # finite garbage: jax.nn's XLA attention multiplies masked-out values by 0 (0 * NaN is NaN)
prefill_xla = jax.jit(functools.partial(gpu_prefill, tile_pages=4, implementation="xla"))


@pytest.mark.parametrize("row", [3, 2, 1])
def test_gpu_prefill_on_gathered_pages(row):
    """`gpu_prefill` on one row of `paged_case`'s pool (16-slot pages, shuffled), cuDNN's part
    through jax.nn's XLA path: whole chunks of 43 after 341 slots (row 3) and from position 0
    (row 2) take the fused decomposition, a left-padded one (row 1) `paged_tiles`; against
    float64 for every real query."""
    (q, lengths, k, v, table), _, want = paged_case(16, False, poison=POISON, chunk=43)
    one = slice(row, row + 1)
    got = np.asarray(ungroup(normalized(prefill_xla(q[one], lengths[one], k, v, table[one])), jnp.float32))
    real = np.asarray(lengths[one]) > 0
    np.testing.assert_allclose(got[real], want[one][real], rtol=0, atol=2e-5)


@on_gpu
def test_gpu_kernels_on_a_gpu():
    """Kernel "gpu" compiled and run on a GPU through the engine's cache attention (`cache_ops`): the
    Pallas decode kernel on bf16 and int8 pools, and one row's prefill chunks by cuDNN (whole
    chunks) or the tiles (a left-padded one) on a bf16 pool, against float64 within bf16 rounding."""
    attend = jax.jit(cache_ops(Layout(make_mesh("sequence=1", GPU[:1])), kernel="gpu")[1])
    for page, int8 in [(16, False), (128, True), (256, False)]:
        (q, lengths, k, v, table), scales, want = paged_case(page, int8, jnp.bfloat16, POISON)
        got = attend(q, lengths - 1, k, v, table, *scales)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=2e-2, err_msg=f"page {page}")
    for row in (3, 2):
        (q, lengths, k, v, table), _, want = paged_case(16, False, jnp.bfloat16, POISON, chunk=64)
        one = slice(row, row + 1)
        got = np.asarray(attend(q[one], lengths[one] - 1, k, v, table[one]), np.float32)
        real = np.asarray(lengths[one]) > 0
        np.testing.assert_allclose(got[real], want[one][real], rtol=0, atol=2e-2, err_msg=f"row {row}")
