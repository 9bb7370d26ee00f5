import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.attention import PAD, blockwise_attention, exact_attention


def naive(q, k, v, q_index, k_index, causal):
    """float64 numpy reference, KV heads repeated the textbook way."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    r = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    mask = (k_index[:, None, :] != PAD)
    if causal:
        mask = mask & (k_index[:, None, :] <= q_index[:, :, None])
    s = np.where(mask[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(mask[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshd->bthd", p, v)


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def inputs(b, t, s, hq, g, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, hq, d)), jax.random.normal(ks[1], (b, s, g, d)),
            jax.random.normal(ks[2], (b, s, g, d)))


@pytest.mark.parametrize("b, t, hq, g, causal", [
    (1, 37, 4, 4, True), (2, 100, 8, 4, True), (3, 61, 8, 2, False), (2, 130, 8, 1, True)])
def test_exact_and_blockwise_match_float64(b, t, hq, g, causal):
    q, k, v = inputs(b, t, t, hq, g, 16)
    idx = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    ref = naive(q, k, v, idx, idx, causal)
    assert rel(exact_attention(q, k, v, idx, idx, causal=causal), ref) < 1e-5
    out = blockwise_attention(q, k, v, idx, idx, causal=causal, block_q=16, block_k=24)
    assert rel(out, ref) < 1e-5
    assert rel(out, exact_attention(q, k, v, idx, idx, causal=causal)) < 1e-5


def test_blockwise_with_padding_and_offsets():
    # left padding in row 0 (PAD keys, queries still present), a cache-like layout: 5 queries at the end
    b, s, hq, g = 2, 45, 8, 2
    q, k, v = inputs(b, 5, s, hq, g, 32, seed=1)
    k_index = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
    k_index[0, :7] = PAD
    q_index = np.broadcast_to(np.arange(s - 5, s, dtype=np.int32), (b, 5))
    ref = naive(q, k, v, q_index, k_index, True)
    for out in (exact_attention(q, k, v, q_index, k_index),
                blockwise_attention(q, k, v, q_index, k_index, block_q=2, block_k=8)):
        assert rel(out, ref) < 1e-5


def test_query_that_sees_nothing_gives_zeros():
    q, k, v = inputs(1, 3, 3, 2, 1, 8)
    k_index = np.full((1, 3), PAD, np.int32)
    q_index = np.arange(3, dtype=np.int32)[None]
    for fn in (exact_attention, blockwise_attention):
        out = np.asarray(fn(q, k, v, q_index, k_index))
        assert np.all(out == 0) and np.all(np.isfinite(out))


def _temp_bytes(fn, t, hq=8, g=2, d=32):
    q = jax.ShapeDtypeStruct((1, t, hq, d), jnp.float32)
    k = jax.ShapeDtypeStruct((1, t, g, d), jnp.float32)
    idx = jax.ShapeDtypeStruct((1, t), jnp.int32)
    return jax.jit(fn).lower(q, k, k, idx, idx).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_not_quadratically():
    """Exact attention holds [T, T] scores per head; blockwise only [block, block] tiles."""
    blockwise = lambda *a: blockwise_attention(*a, block_q=256, block_k=256)
    small, large = _temp_bytes(blockwise, 1024), _temp_bytes(blockwise, 4096)
    assert large < 5 * small                                   # 4x tokens: about 4x bytes
    assert _temp_bytes(exact_attention, 4096) >= 8 * 4096 * 4096 * 4
    assert large < 8 * 4096 * 4096 * 4 / 20
