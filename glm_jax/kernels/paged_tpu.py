"""JAX's Pallas TPU paged-attention kernels behind the engine's per-device paged signature:
kernel(q [b,C,Hq,D], lengths [b,C], k, v [G,P,page,D], table [b,M], k_scale, v_scale) -> State.

`tpu_paged_decode` (C = 1) runs `paged_attention`'s kernel body in a pallas_call of its own that
keeps the running max and sum JAX's wrapper drops, so its State merges by log-sum-exp across
`sequence` devices. `tpu_ragged_paged` (any C) wraps `ragged_paged_attention`, which returns only
the normalized output: its State is exact on a pool held by ONE device (no merge). `tpu_kernel_report`
compiles both ahead of time for a TPU topology and returns what the compiler says.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..attention import State, group_queries

PAGES_PER_BLOCK = 8        # pages a decode program fetches at a time (double-buffered DMA), at most
QUERIES_PER_BLOCK = 32     # ragged kernel: query tokens per block (its untuned default)
SCALE_ROWS = 8             # int8 kernel: pages whose scales one (8, 128) tile brings (the page's is used)
MIN_Q_PER_KV = 8           # R below this: q travels as [b,Hq,1,D] (the kernel's own layout hint)


def compute_block(pages: int, most: int = PAGES_PER_BLOCK) -> int:
    """pages_per_compute_block for a table of `pages` pages a row: its largest divisor <= most."""
    return max(d for d in range(1, min(pages, most) + 1) if pages % d == 0)


def tpu_paged_decode(q, lengths, k, v, table, k_scale=None, v_scale=None, *, pages_per_compute_block=None,
                     megacore_mode: str | None = None, interpret: bool = False) -> State:
    """One query a row (C = 1) by `paged_attention`'s TPU kernel; State [b,G,R,1(,D)] with m and l.
    Row i sees slots [0, lengths[i,0]) through table[i]. The kernel DMAs whole compute blocks of
    pages_per_compute_block pages (default `compute_block`, must divide M): EVERY table entry must
    be a valid page id (pad with any, e.g. 0) and pages must hold finite values (masking adds a
    finite -0.7 * float32 max). int8 pools (with [G,P,page] scales) go to `tpu_int8_paged_decode`:
    JAX's kernel wants scales of K's full shape, a float32 copy 4x the int8 pool per call.
    megacore_mode None, "kv_head" or "batch" (chips with two TensorCores: v4, v5p)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel as pa

    if k_scale is not None:
        return tpu_int8_paged_decode(q, lengths, k, v, table, k_scale, v_scale, interpret=interpret)
    b, _, hq, d = q.shape
    g, _, page, _ = k.shape
    r, pages = hq // g, table.shape[1]
    block = pages_per_compute_block or compute_block(pages)
    cores = 1 if megacore_mode is None else 2
    qf = q[:, 0].astype(jnp.float32) * (1.0 / np.sqrt(d))         # the kernel does not scale scores
    shape = (b, hq, d) if r % MIN_Q_PER_KV == 0 else (b, hq, 1, d)
    squeeze = (None,) * (len(shape) - 3)
    if megacore_mode == "kv_head":
        at = lambda c, i, h, *_: (i, h * cores + c) + (0,) * (len(shape) - 2)
    elif megacore_mode == "batch":
        at = lambda c, i, h, *_: (i * cores + c, h) + (0,) * (len(shape) - 2)
    else:
        at = lambda c, i, h, *_: (i, h) + (0,) * (len(shape) - 2)
    q_spec = pl.BlockSpec((None, r, *squeeze, d), at)
    buffer = lambda dtype: pltpu.VMEM((2, block, page, d), dtype)   # double-buffered pages
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    grid = (cores, b // cores if megacore_mode == "batch" else b, g // cores if megacore_mode == "kv_head" else g)
    out, m, l = pl.pallas_call(
        functools.partial(pa.paged_flash_attention_kernel_inline_seq_dim, batch_size=b, pages_per_compute_block=block,
                          pages_per_sequence=pages, mask_value=pa.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
                          megacore_mode=megacore_mode),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, out_specs=[q_spec] * 3,
            in_specs=[q_spec, anywhere, None, anywhere, None],
            scratch_shapes=(buffer(k.dtype), None, buffer(v.dtype), None,
                            pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((2,)))),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32)] * 3,   # m, l broadcast over D, as the kernel writes them
        interpret=pltpu.InterpretParams() if interpret else False, name="tpu_paged_decode",
    )(lengths[:, 0].astype(jnp.int32), table.reshape(-1).astype(jnp.int32), jnp.zeros((1,), jnp.int32),
      jnp.ones((1,), jnp.int32), qf.reshape(shape), k, None, v, None)
    grouped = lambda x: x.reshape(b, g, r, 1, d)
    m, l = grouped(m)[..., 0], grouped(l)[..., 0]
    return State(m=m, l=l, acc=grouped(out) * l[..., None])


def tpu_int8_paged_decode(q, lengths, k, v, table, k_scale, v_scale, *, interpret: bool = False) -> State:
    """`tpu_paged_decode` on an int8 pool [G,P,page,D] with float32 scales [G,P,page] (value =
    int8 * scale), no copy of the pool or its scales: the scales fold into the scores (q.k = s_k
    q.k8) and the probabilities (sum p v = sum (p s_v) v8), both along the slot (lane) axis.
    Grid (row, KV head, table page): each step brings one page of K and V by its table entry
    (scalar-prefetched; steps past the row's last visible page keep the same block index, which
    Pallas' pipeline does not fetch again, and skip their compute) and the (8, page) tile of scales
    holding that page's,
    accumulating m, l, acc in VMEM. One page a step: simple, not tuned (JAX's multi-page DMA
    kernel serves float pools)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    b, _, hq, d = q.shape
    g, num_pages, page, _ = k.shape
    r, pages = hq // g, table.shape[1]
    qg = (q[:, 0].astype(jnp.float32) * (1.0 / np.sqrt(d))).reshape(b, g, r, d)
    rows = min(SCALE_ROWS, num_pages)                      # a pool of fewer pages: its whole scales

    def page_at(i, j, lengths_ref, table_ref):  # the pool page of row i's table page j (its last one past it)
        last = jnp.maximum((lengths_ref[i] + page - 1) // page - 1, 0)
        return table_ref[i * pages + jnp.minimum(j, last)]

    kv_spec = pl.BlockSpec((None, None, page, d), lambda i, h, j, n, t: (h, page_at(i, j, n, t), 0, 0))
    scale_spec = pl.BlockSpec((None, rows, page), lambda i, h, j, n, t: (h, page_at(i, j, n, t) // rows, 0))
    row_spec = lambda width: pl.BlockSpec((None, None, r, width), lambda i, h, j, n, t: (i, h, 0, 0))

    def kernel(lengths_ref, table_ref, q_ref, k_ref, ks_ref, v_ref, vs_ref, acc_ref, m_ref, l_ref, acc_sc, m_sc, l_sc):
        i, j = pl.program_id(0), pl.program_id(2)
        length = lengths_ref[i]

        @pl.when(j == 0)
        def init():
            m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
            l_sc[...] = jnp.zeros_like(l_sc)
            acc_sc[...] = jnp.zeros_like(acc_sc)

        @pl.when(j * page < length)
        def step():
            at = page_at(i, j, lengths_ref, table_ref) % rows
            k_scale_row = ks_ref[pl.ds(at, 1), :]                                       # [1, page]
            v_scale_row = vs_ref[pl.ds(at, 1), :]
            s = jax.lax.dot_general(q_ref[...], k_ref[...].astype(jnp.float32), (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * k_scale_row   # [R, page]
            slot = j * page + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(slot < length, s, -jnp.inf)
            m_prev = m_sc[...]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))                    # finite: slot j*page is seen
            p = jnp.exp(s - m_new)
            alpha = jnp.exp(m_prev - m_new)
            l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
            acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
                p * v_scale_row, v_ref[...].astype(jnp.float32), (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32)
            m_sc[...] = m_new

        @pl.when(j == pages - 1)
        def done():
            acc_ref[...], m_ref[...], l_ref[...] = acc_sc[...], m_sc[...], l_sc[...]

    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, g, pages),
            in_specs=[row_spec(d), kv_spec, scale_spec, kv_spec, scale_spec],
            out_specs=[row_spec(d), row_spec(1), row_spec(1)],
            scratch_shapes=[pltpu.VMEM((r, d), jnp.float32), pltpu.VMEM((r, 1), jnp.float32),
                            pltpu.VMEM((r, 1), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        out_shape=[jax.ShapeDtypeStruct((b, g, r, d), jnp.float32), jax.ShapeDtypeStruct((b, g, r, 1), jnp.float32),
                   jax.ShapeDtypeStruct((b, g, r, 1), jnp.float32)],
        interpret=pltpu.InterpretParams() if interpret else False, name="tpu_int8_paged_decode",
    )(lengths[:, 0].astype(jnp.int32), table.reshape(-1).astype(jnp.int32), qg, k, k_scale, v, v_scale)
    return State(m=m, l=l, acc=acc[..., None, :])


def tpu_ragged_paged(q, lengths, k, v, table, k_scale=None, v_scale=None, *, pages_per_block=PAGES_PER_BLOCK,
                     queries_per_block=QUERIES_PER_BLOCK, implementation: str = "kernel") -> State:
    """A prefill chunk or decode step (C queries a row) by `ragged_paged_attention`. Its causal rule
    is fixed: a row's C queries are the LAST C of its kv_len = lengths[i, C-1] visible slots, i.e.
    lengths[i, c] = kv_len - C + 1 + c: true on a pool held by one device, not on pages striped
    over `sequence` (a device's local counts then skip). Rows with kv_len 0 give zeros. The kernel
    returns the normalized output only: State(m=0, l=1 where something is visible, else 0,
    acc=out), valid for one device only (no log-sum-exp merge). Float pools only (its int8 takes
    one static scale per tensor, not ours per slot). The pool is re-laid out to the kernel's
    [P, page, 2G, D] (K and V heads interleaved): a copy of the whole local pool per call.
    implementation "reference": JAX's reference implementation (a test seam for CPUs; eager)."""
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    if k_scale is not None:
        raise ValueError("ragged_paged_attention takes per-tensor int8 scales only; use tpu_paged_decode or tiles")
    b, c, hq, d = q.shape
    g, pool, page, _ = k.shape
    kv_pages = jnp.stack([k, v], axis=3).transpose(1, 2, 0, 3, 4).reshape(pool, page, 2 * g, d)
    kv_len = lengths[:, -1].astype(jnp.int32)
    args = (q.reshape(b * c, hq, d), kv_pages, jnp.maximum(kv_len, c), table.astype(jnp.int32),
            jnp.arange(b + 1, dtype=jnp.int32) * c, jnp.array([b], jnp.int32))
    if implementation == "reference":
        out = rpa.ref_ragged_paged_attention(*args, sm_scale=1.0 / np.sqrt(d))
    else:
        out = rpa.ragged_paged_attention(*args, sm_scale=1.0 / np.sqrt(d), num_kv_pages_per_block=pages_per_block,
                                         num_queries_per_block=queries_per_block)
    seen = (lengths > 0).astype(jnp.float32)                                  # [b, C]
    out = group_queries(out.reshape(b, c, hq, d), g).astype(jnp.float32) * seen[:, :, None, None, None]
    seen = jnp.broadcast_to(seen[:, None, None, :], (b, g, hq // g, c))
    return State(m=jnp.zeros_like(seen), l=seen, acc=out.transpose(0, 2, 3, 1, 4))


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def tpu_kernel_report(topology: str = "v5e:1x1", *, batch: int = 64, chunk: int = 512, q_heads: int = 32,
                      kv_heads: int = 2, head_dim: int = 128, page: int = 128, pool_pages: int = 1024,
                      table_pages: int = 1024) -> list[dict]:
    """Compiles the wrappers ahead of time for one chip of a TPU `topology` (needs libtpu), at the
    per-device shapes given (GLM-4-9B's by default: pass kv_heads=1, q_heads=16 for KV heads split
    over tensor): decode of `batch` rows on bf16 and int8 pools, the ragged kernel for a decode
    step and for one row's prefill chunk of `chunk` tokens. One dict per case: name, dtype,
    compiled (bool), error (first line, when not), and the compiler's memory_analysis bytes."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[:1]
    mesh = Mesh(device, ("chip",))
    struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    cases = [("tpu_paged_decode", tpu_paged_decode, batch, 1, jnp.bfloat16),
             ("tpu_paged_decode", tpu_paged_decode, batch, 1, jnp.int8),
             ("tpu_ragged_paged", tpu_ragged_paged, batch, 1, jnp.bfloat16),
             ("tpu_ragged_paged", tpu_ragged_paged, 1, chunk, jnp.bfloat16)]
    report = []
    for name, kernel, rows, c, dtype in cases:
        pool = struct((kv_heads, pool_pages, page, head_dim), dtype)
        scales = (struct(pool.shape[:-1], jnp.float32),) * 2 if dtype == jnp.int8 else ()
        args = (struct((rows, c, q_heads, head_dim), jnp.bfloat16), struct((rows, c), jnp.int32), pool, pool,
                struct((rows, table_pages), jnp.int32), *scales)
        fact = dict(name=name, dtype=jnp.dtype(dtype).name, rows=rows, queries=c, compiled=False)
        try:
            with jax.set_mesh(mesh):        # Pallas' TPU lowering asks the mesh's device for the chip
                memory = jax.jit(kernel).lower(*args).compile().memory_analysis()
            fact.update(compiled=True, **{f: getattr(memory, f) for f in MEMORY_FIELDS})
        except Exception as e:  # the compiler's refusal is the fact reported
            fact["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        report.append(fact)
    return report
