"""The engine's paged KV cache (engine/cache.py): writes through page tables and attention over
them against float64 numpy attention, on 1 to 8 devices; int8 pages; local lengths; the kernel
choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from glm_jax.engine import cache as engine_cache
from glm_jax.engine.cache import DROP, cache_ops, local_lengths, page_devices, page_slots, quantize
from glm_jax.engine.paged_attention import (TPU_TABLE_ENTRIES, block_pages, gpu_decode, gpu_prefill, local_kernel,
                                            paged_tiles, resolve_kernel, score_budget, tpu_decode)
from glm_jax.kernels import paged_tpu
from glm_jax.sharding import Layout, make_mesh

HQ, G, D = 8, 2, 16


def reference(q, k, v, q_pos):
    """float64 attention of one row: q [C,Hq,D] at positions q_pos [C] (-1: nothing), k/v [S,G,D]
    in position order, causal."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, HQ // G, axis=1) for x in (k, v))
    s = np.einsum("chd,shd->hcs", q, k) / np.sqrt(D)
    mask = np.arange(k.shape[0])[None, None, :] <= q_pos[None, :, None]
    s = np.where(mask, s, -np.inf)
    top = np.where(np.isfinite(s.max(-1, keepdims=True)), s.max(-1, keepdims=True), 0.0)
    p = np.exp(s - top)
    p /= np.where(p.sum(-1, keepdims=True) > 0, p.sum(-1, keepdims=True), 1.0)
    return np.einsum("hcs,shd->chd", p, v)


def layout_of(mesh: str) -> Layout:
    devices = int(np.prod([int(part.split("=")[1]) for part in mesh.split(",")]))
    return Layout(make_mesh(mesh, jax.devices()[:devices]))


def tables(lengths, page, devices, pages_per_device, width, rng):
    """Page tables [b, width]: logical page j of each row on device j % devices, pages drawn
    without repeats from each device's block (the allocator's placement), the rest 0."""
    free = [list(rng.permutation(np.arange(d * pages_per_device, (d + 1) * pages_per_device)))
            for d in range(devices)]
    table = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        for j in range(-(-n // page)):
            table[i, j] = free[j % devices].pop()
    return table


@pytest.mark.parametrize("mesh, page, lengths, chunk, int8", [
    ("sequence=1", 16, [300, 1, 77], 1, False), ("sequence=1", 16, [300, 40, 77], 24, False),
    ("sequence=4", 8, [301, 9, 130], 1, False), ("sequence=4", 8, [301, 33, 130], 32, False),
    ("tensor=2,sequence=4", 16, [500, 17, 250], 1, False), ("tensor=2,sequence=4", 16, [500, 40, 250], 40, False),
    ("data=2,sequence=2", 4, [97, 5, 64], 1, False), ("sequence=3", 8, [200, 25, 90], 12, False),
    ("sequence=1", 16, [300, 40, 77], 24, True), ("tensor=2,sequence=4", 16, [500, 17, 250], 1, True),
])
def test_paged_attend_matches_reference(mesh, page, lengths, chunk, int8):
    """Rows of different lengths in pages scattered over the pool (each row's logical page j on
    device j % n): K/V written through `write`, then decode (one query a row) or a prefill chunk (a
    row's last `chunk` positions, rows shorter than the chunk left-padded) attends through the
    tables, against float64; int8 pages against their dequantized values."""
    check_attend(mesh, page, lengths, chunk, int8)


@pytest.mark.parametrize("int8", [False, True])
def test_tpu_decode_merges_across_page_devices(monkeypatch, int8):
    """Kernel "tpu" on pages striped over 4 devices, its kernels in Pallas' TPU interpreter (JAX's
    for float pools, `tpu_int8_paged_decode` for int8 ones): each device's running max and sum
    merge by log-sum-exp to the float64 answer."""
    monkeypatch.setattr(engine_cache, "resolve_kernel", lambda kernel, platform: "tpu")
    monkeypatch.setattr(paged_tpu, "tpu_paged_decode", functools.partial(paged_tpu.tpu_paged_decode, interpret=True))
    check_attend("sequence=4", 16, [301, 9, 130], 1, int8, kernel="tpu")


def check_attend(mesh, page, lengths, chunk, int8, kernel="auto"):
    """`test_paged_attend_matches_reference`'s case, attended with `kernel`."""
    layout = layout_of(mesh)
    n = page_devices(layout)
    rng = np.random.default_rng(sum(lengths) + chunk)
    width = -(-(-(-max(lengths) // page)) // n) * n + n                   # some spare table entries
    per_device = width * len(lengths) // n + 3
    table = tables(lengths, page, n, per_device, width, rng)
    pool_shape = (G, per_device * n, page, D)
    write, attend = cache_ops(layout, budget=chunk * HQ * 4 * page, kernel=kernel)   # 4-page tiles or fewer
    write = jax.jit(write)
    b, longest = len(lengths), max(lengths)
    # values bf16 holds exactly: the TPU kernel's products take bf16 passes, as on a TPU
    held = (lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)) if kernel == "tpu" else np.float32
    k_ref, v_ref = (held(rng.standard_normal((b, longest, G, D))) for _ in range(2))
    positions = np.broadcast_to(np.arange(longest, dtype=np.int32), (b, longest))
    valid = positions < np.array(lengths)[:, None]
    slots = page_slots(jnp.asarray(table), jnp.asarray(positions), jnp.asarray(valid), page)
    if int8:
        pools = []
        for ref in (k_ref, v_ref):
            q8, scale = quantize(jnp.asarray(ref))
            ref[:] = np.asarray(q8, np.float32) * np.asarray(scale)[..., None]
            pools.append(write(jnp.zeros(pool_shape, jnp.int8), q8, slots))
            pools.append(write(jnp.zeros(pool_shape[:3], jnp.float32), scale, slots))
        k, k_scale, v, v_scale = pools
        scales = (k_scale, v_scale)
    else:
        garbage = jnp.asarray(rng.standard_normal(pool_shape) * 1e4, jnp.float32)     # what other requests left
        k, v = (write(garbage, jnp.asarray(x), slots) for x in (k_ref, v_ref))
        scales = ()
    q = held(rng.standard_normal((b, chunk, HQ, D)))
    q_pos = np.array([[p if p >= 0 else -1 for p in range(n_ - chunk, n_)] for n_ in lengths], np.int32)
    got = np.asarray(jax.jit(attend)(jnp.asarray(q), jnp.asarray(q_pos), k, v, jnp.asarray(table), *scales))
    for i in range(b):
        want = reference(q[i], k_ref[i], v_ref[i], q_pos[i])
        np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-5, err_msg=f"row {i}")


@pytest.mark.parametrize("ragged", [True, False])
def test_paged_tiles_read_only_visible_pages(ragged):
    """Pages past a row's visible slots, and table entries past them, do not count: huge values
    there (what other requests left) leave the answer exact; an empty query gets zeros. Both ways
    of computing several rows: one list of the pages they see (`ragged_tiles`), and every row over
    the longest row's tiles."""
    page, rng = 16, np.random.default_rng(3)
    k, v = (rng.standard_normal((G, 12, page, D)).astype(np.float32) for _ in range(2))
    k[:, 5:], v[:, 5:] = 3e4, -3e4                                          # pages 5.. are someone else's
    table = np.array([[3, 1, 4, 9, 10, 11], [0, 2, 7, 8, 6, 5]], np.int32)
    lengths = np.array([[40, 41], [20, 0]], np.int32)                      # row 1 sees pages 0 and 2 only
    q = rng.standard_normal((2, 2, HQ, D)).astype(np.float32)
    state = jax.jit(paged_tiles, static_argnames=("tile_pages", "ragged"))(
        jnp.asarray(q), jnp.asarray(lengths), jnp.asarray(k), jnp.asarray(v), jnp.asarray(table), tile_pages=2,
        ragged=ragged)
    out = np.asarray(state.acc / np.maximum(np.asarray(state.l), 1e-30)[..., None])      # [b, G, R, C, D]
    assert np.isfinite(out).all() and not out[1, :, :, 1].any()
    rows = [(k[:, [3, 1, 4]], v[:, [3, 1, 4]]), (k[:, [0, 2]], v[:, [0, 2]])]
    for i, (kr, vr) in enumerate(rows):
        kr, vr = (x.reshape(G, -1, D).transpose(1, 0, 2) for x in (kr, vr))  # [S, G, D] in position order
        want = reference(q[i], kr, vr, lengths[i] - 1)
        got = out[i].transpose(2, 0, 1, 3).reshape(2, HQ, D)
        visible = lengths[i] > 0
        np.testing.assert_allclose(got[visible], want[visible], rtol=0, atol=2e-5)


@settings(max_examples=200, deadline=None)
@given(st.integers(-1, 5000), st.sampled_from([1, 2, 3, 8]), st.sampled_from([4, 16, 128]), st.data())
def test_local_lengths_count_the_visible_local_slots(q_pos, devices, page, data):
    """A query at q_pos sees, on device d, exactly the local slots of positions <= q_pos among the
    row's logical pages d, d + n, ...: a prefix of them."""
    device = data.draw(st.integers(0, devices - 1))
    got = int(local_lengths(jnp.array([[q_pos]]), device, devices, page)[0, 0])
    positions = np.arange(q_pos + 1)
    assert got == int(np.sum((positions // page) % devices == device))


def test_page_slots_and_block_pages():
    table = jnp.array([[5, 2, 7], [1, 0, 3]], jnp.int32)
    slots = page_slots(table, jnp.array([[0, 9, 17], [3, 4, 4]]), jnp.array([[True, True, True], [True, True, False]]),
                       8)
    assert np.asarray(slots).tolist() == [[40, 17, 57], [11, 12, DROP]]
    tpu = score_budget("tpu")
    assert block_pages(128, 512 * 8, tpu) == 32 and block_pages(128, 4096 * 32, tpu) == 1
    assert block_pages(16, 1 * 32, score_budget("cpu")) == 512 and block_pages(256, 4096 * 32, tpu) == 1


def test_platform_kernels_are_refused_elsewhere():
    """Kernels "gpu" and "tpu" compile for their platform only: a CPU mesh refuses them instead of
    running something else; "auto" takes the platform's kernel, the portable one on a CPU."""
    layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    for kernel in ("gpu", "tpu"):
        with pytest.raises(ValueError, match=f"kernel '{kernel}' needs {kernel.upper()} devices, not cpu"):
            cache_ops(layout, kernel=kernel)
    assert [resolve_kernel("auto", p) for p in ("cpu", "gpu", "tpu")] == ["xla", "gpu", "tpu"]
    with pytest.raises(ValueError, match="unknown attention kernel 'cudnn'; choose from auto, xla, gpu, tpu"):
        resolve_kernel("cudnn", "gpu")


@pytest.mark.parametrize("kernel, devices, rows, chunk, table_pages, int8, want", [
    ("gpu", 1, 8, 1, 64, True, gpu_decode), ("gpu", 1, 1, 512, 64, False, gpu_prefill),
    ("gpu", 1, 1, 512, 64, True, paged_tiles), ("gpu", 1, 2, 512, 64, False, paged_tiles),
    ("gpu", 2, 8, 1, 64, False, paged_tiles),
    ("tpu", 8, 64, 1, 1024, False, tpu_decode), ("tpu", 8, 64, 1, 1024, True, tpu_decode),
    ("tpu", 8, 1, 512, 1024, False, paged_tiles), ("tpu", 1, 2, 1, TPU_TABLE_ENTRIES // 2, False, tpu_decode),
    ("tpu", 1, 2, 1, TPU_TABLE_ENTRIES // 2 + 1, False, paged_tiles), ("xla", 1, 1, 1, 64, False, paged_tiles),
])
def test_local_kernel_choice(kernel, devices, rows, chunk, table_pages, int8, want):
    """GPU: decode on one device, prefill of one row of a float pool on one device; TPU: decode
    (float or int8 pools) whose tables fit its scalar memory, on any devices; the tiles otherwise."""
    assert local_kernel(kernel, devices, rows, chunk, table_pages, int8) is want


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
