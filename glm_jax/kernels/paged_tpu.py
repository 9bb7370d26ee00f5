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
INT8_SCALE = 127.5         # the TPU kernel's int8 convention: value = int8 * scale / 127.5
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
    finite -0.7 * float32 max). int8 pools: the kernel wants scales of K's full shape, so
    [G,P,page] scales are broadcast over D (a float32 copy 4x the int8 pool, per call).
    megacore_mode None, "kv_head" or "batch" (chips with two TensorCores: v4, v5p)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel as pa

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
    if k_scale is not None:
        k_scale, v_scale = (jnp.broadcast_to((s * INT8_SCALE)[..., None], k.shape) for s in (k_scale, v_scale))
        scale_spec, scale_buffer = anywhere, buffer(jnp.float32)
    else:
        scale_spec = scale_buffer = None
    grid = (cores, b // cores if megacore_mode == "batch" else b, g // cores if megacore_mode == "kv_head" else g)
    out, m, l = pl.pallas_call(
        functools.partial(pa.paged_flash_attention_kernel_inline_seq_dim, batch_size=b, pages_per_compute_block=block,
                          pages_per_sequence=pages, mask_value=pa.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
                          megacore_mode=megacore_mode),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, out_specs=[q_spec] * 3,
            in_specs=[q_spec, anywhere, scale_spec, anywhere, scale_spec],
            scratch_shapes=(buffer(k.dtype), scale_buffer, buffer(v.dtype), scale_buffer,
                            pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((2,)))),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32)] * 3,   # m, l broadcast over D, as the kernel writes them
        interpret=pltpu.InterpretParams() if interpret else False, name="tpu_paged_decode",
    )(lengths[:, 0].astype(jnp.int32), table.reshape(-1).astype(jnp.int32), jnp.zeros((1,), jnp.int32),
      jnp.ones((1,), jnp.int32), qf.reshape(shape), k, k_scale, v, v_scale)
    grouped = lambda x: x.reshape(b, g, r, 1, d)
    m, l = grouped(m)[..., 0], grouped(l)[..., 0]
    return State(m=m, l=l, acc=grouped(out) * l[..., None])


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
