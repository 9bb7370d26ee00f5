"""The engine's KV cache (engine/cache.py): write and attend against float64 numpy attention, on 1
and 8 devices; int8 storage; the kernel choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.attention import PAD, cache_forward, init_state, normalized, ungroup
from glm_jax.engine.cache import cache_block, cache_ops, cache_order, quantize, resolve_kernel, score_budget
from glm_jax.sharding import Layout, make_mesh

B, HQ, G, D = 2, 8, 2, 16


def reference(q, k, v, q_index, k_index):
    """float64 attention: q [B,C,Hq,D], k/v [B,S,G,D] in slot order, causal by index."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, HQ // G, axis=2) for x in (k, v))
    s = np.einsum("bchd,bshd->bhcs", q, k) / np.sqrt(D)
    mask = (k_index[:, None, None, :] <= q_index[:, None, :, None]) & (k_index[:, None, None, :] != PAD)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhcs,bshd->bchd", p, v)


def filled_cache(mesh: str, length: int, filled: int, pad_row1: int, seed: int = 0, int8: bool = False):
    """A cache of `length` slots with slots [0, filled) written (row 1 left-padded by pad_row1),
    through the sharded write. Returns (layout, order, k, v, index, k_ref, v_ref, index_ref,
    scales); int8: k/v quantized, scales (k_scale, v_scale), k_ref/v_ref their dequantized values."""
    devices = int(np.prod([int(part.split("=")[1]) for part in mesh.split(",")]))
    layout = Layout(make_mesh(mesh, jax.devices()[:devices]))
    order = cache_order(layout, G)
    write = jax.jit(cache_ops(layout, order)[0])   # one compile per shape, not one per primitive
    rng = np.random.default_rng(seed)
    k_ref, v_ref = (rng.standard_normal((B, length, G, D)).astype(np.float32) for _ in range(2))
    index_ref = np.full((B, length), PAD, np.int32)
    index_ref[:, :filled] = np.arange(filled)
    index_ref[1, :pad_row1] = PAD
    shape = tuple({"b": B, "s": length, "g": G, "d": D}[c] for c in order)
    slots = jnp.arange(filled, dtype=jnp.int32)
    index = write(jnp.full((B, length), PAD, jnp.int32), jnp.asarray(index_ref[:, :filled]), slots)
    if not int8:
        k = write(jnp.zeros(shape, jnp.float32), jnp.asarray(k_ref[:, :filled]), slots)
        v = write(jnp.zeros(shape, jnp.float32), jnp.asarray(v_ref[:, :filled]), slots)
        return layout, order, k, v, index, k_ref, v_ref, index_ref, ()
    stored, scales = [], []
    for ref in (k_ref, v_ref):
        q, scale = quantize(jnp.asarray(ref))
        ref[:] = np.asarray(q, np.float32) * np.asarray(scale)[..., None]       # what the cache holds
        stored.append(write(jnp.zeros(shape, jnp.int8), q[:, :filled], slots))
        scales.append(write(jnp.zeros(shape[:order.index("d")], jnp.float32), scale[:, :filled], slots))
    return layout, order, *stored, index, k_ref, v_ref, index_ref, tuple(scales)


@pytest.mark.parametrize("mesh, length, filled, chunk, int8", [
    ("sequence=1", 2304, 1999, 1, False), ("sequence=1", 2304, 1999, 96, False), ("sequence=1", 300, 211, 1, False),
    ("sequence=8", 8192, 3001, 1, False), ("sequence=8", 8192, 3001, 128, False),
    ("tensor=2,sequence=4", 4096, 2500, 1, False), ("tensor=2,sequence=4", 4096, 2500, 64, False),
    ("sequence=3", 3072, 2049, 1, False), ("sequence=3", 3072, 2049, 40, False),
    ("sequence=1", 2304, 1999, 1, True), ("sequence=1", 2304, 1999, 96, True), ("sequence=8", 8192, 3001, 128, True),
    ("tensor=2,sequence=4", 4096, 2500, 1, True),   # one KV head per device: the [B, G, S, D] cache
])
def test_attend_matches_reference(mesh, length, filled, chunk, int8):
    """Decode (one query) and prefill chunks (the last `chunk` filled slots as queries), with a
    left-padded row, striped slots and awkward fill levels; int8: against the dequantized values
    (the attention itself adds no error beyond float32 rounding)."""
    layout, order, k, v, index, k_ref, v_ref, index_ref, scales = filled_cache(mesh, length, filled, filled // 3,
                                                                               int8=int8)
    _, attend = cache_ops(layout, order, budget=chunk * HQ * 256)          # 256-slot tiles or fewer
    q = np.random.default_rng(1).standard_normal((B, chunk, HQ, D)).astype(np.float32)
    q_index = np.broadcast_to(np.arange(filled - chunk, filled, dtype=np.int32), (B, chunk))
    got = jax.jit(attend)(jnp.asarray(q), jnp.asarray(q_index), k, v, index, *scales)
    want = reference(q, k_ref, v_ref, q_index, index_ref)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("chunk, groups", [(64, G), (96, 1), (1, G), (1, 1)])
def test_cache_forward_visits_only_filled_tiles(chunk, groups):
    """A prefill chunk, or a decode query, near the start of a large cache reads the filled tiles
    only: garbage (NaN) beyond the last filled slot is never touched, whatever the number of KV
    groups (the decode path once took a single pass over every slot when a device held one)."""
    s, filled = 4096, 700
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, s, groups, D)).astype(np.float32)
    v = rng.standard_normal((1, s, groups, D)).astype(np.float32)
    want_k, want_v = k[:, :1024].copy(), v[:, :1024].copy()
    k[:, 1024:] = np.nan
    v[:, 1024:] = np.nan
    index = np.full((1, s), PAD, np.int32)
    index[:, :filled] = np.arange(filled)
    q = rng.standard_normal((1, chunk, groups, HQ // G, D)).astype(np.float32)
    qi = np.arange(filled - chunk, filled, dtype=np.int32)[None]
    forward = jax.jit(functools.partial(cache_forward, block_k=512))
    state = forward(init_state(1, chunk, groups, HQ // G, D), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                    jnp.asarray(qi), jnp.asarray(index))
    got = ungroup(normalized(state), jnp.float32)
    hq = groups * (HQ // G)
    want = reference(q.reshape(1, chunk, hq, D), want_k, want_v, qi, index[:, :1024])
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


def test_cache_block():
    """Score tiles within the budget: 4,096 queries x 32 heads on v5e get 128-slot tiles."""
    tpu, gpu = score_budget("tpu"), score_budget("gpu")
    assert cache_block(300, 512 * 8, tpu) == 300 and cache_block(8192, 512 * 8, tpu) == 4096
    assert cache_block(6144, 512 * 8, tpu) == 2048 and cache_block(131072, 4096 * 32, tpu) == 128
    assert cache_block(16384, 512 * 8, score_budget("cpu")) == 512
    assert cache_block(2560, 8 * 256, 8 * 256 * 1024) == 512 and cache_block(139264, 4096 * 32, gpu) == 2048


def test_gpu_kernel_is_refused_off_gpus():
    """Kernel "gpu" compiles for GPUs only: a CPU mesh refuses it instead of running something else;
    "auto" takes the portable kernel there."""
    layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    with pytest.raises(ValueError, match="kernel 'gpu' needs GPU devices"):
        cache_ops(layout, "bgsd", kernel="gpu")
    assert resolve_kernel("auto", "cpu") == "xla"
    with pytest.raises(ValueError, match="unknown attention kernel 'cudnn'; choose from auto, xla, gpu"):
        resolve_kernel("cudnn", "gpu")


def test_quantize_round_trip():
    """Symmetric int8 per vector: |x - q * scale| <= scale / 2 = max|x| / 254; zeros stay zero."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50, 4, 128)) * np.geomspace(1e-3, 1e3, 4)[:, None],
                    jnp.float32)
    x = x.at[0, 0, 0].set(0.0)
    q, scale = quantize(x)
    assert q.dtype == jnp.int8 and scale.shape == x.shape[:-1] and int(jnp.abs(q).max()) == 127
    err = jnp.abs(q.astype(jnp.float32) * scale[..., None] - x)
    assert bool((err <= scale[..., None] / 2 * (1 + 1e-6)).all())
    assert bool((q[0, 0, 0] == 0).all()) and float(scale[0, 0, 0]) == 0.0
