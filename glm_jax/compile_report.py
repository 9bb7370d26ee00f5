"""Ahead-of-time compilation of the prefill and decode programs (or one train step) at real sizes,
nothing allocated.

Targets: a TPU topology ("v5e:2x4"; needs the `libtpu` wheel, extra `[tpu]`) compiled on this
machine with `jax.experimental.topologies`, or this process's own devices ("local"). Per program:
argument, output, alias and temporary bytes per device from `memory_analysis()`, the peak
(argument + output - alias + temporary), the chip's HBM and whether it fits, FLOPs from
`cost_analysis()` and the time they take at the chip's stated peak.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from .config import GLMConfig
from .model import abstract_model
from .options import DEFAULT_KERNEL, DEFAULT_REMAT, LOSS_CHUNK, PAGE_SIZE, Quantization
from .params import param_specs
from .quantize import assemble, stored_specs
from .engine.cache import abstract_cache, cache_dtype, page_devices, pool_pages, table_width
from .engine.paged_attention import resolve_kernel
from .engine.programs import programs_for
from .sharding import Layout, make_mesh

GiB = 1 << 30

# Per chip: HBM bytes and bf16 peak FLOP/s, as the vendor states them.
CHIPS = {
    "v4": (32 * GiB, 275e12),
    "v5e": (int(15.75 * GiB), 197e12),   # 16 GiB, of which XLA lets a program use 15.75
    "v5p": (95 * GiB, 459e12),
    "v6e": (int(31.24 * GiB), 918e12),  # 32 GiB, of which XLA lets a program use 31.24
}

# The mesh each topology gets unless told otherwise, and whether weights are also sharded over
# `sequence` (FSDP-style, gathered layer by layer): needed where one chip cannot hold the model
# 1/tensor of the weights plus its share of a 1M-token cache.
DEFAULT_MESH = {
    "v5e": ("sequence=-1", True),
    "v4": ("tensor=2,sequence=-1", False),
    "v5p": ("tensor=2,sequence=-1", False),
    "v6e": ("tensor=2,sequence=-1", False),
}


@dataclasses.dataclass
class ProgramReport:
    program: str
    topology: str
    mesh: str
    seq_len: int
    batch: int
    argument_bytes_per_device: int
    output_bytes_per_device: int
    alias_bytes_per_device: int
    temp_bytes_per_device: int
    peak_bytes_per_device: int
    kv_cache_bytes_per_device: int | None   # None: the program has no KV cache (a train step)
    kv_cache_tokens: int | None             # slots of the KV page pool (shared by the batch)
    hbm_bytes_per_device: int | None
    fits: bool | None
    flops: float                   # XLA's cost analysis, per device (a loop body counts once)
    model_flops: float             # analytic: 2 x parameters x tokens + attention, all devices
    seconds_at_peak: float | None  # model_flops / (devices x the chip's bf16 peak)

    def format(self) -> str:
        g = lambda b: f"{b / GiB:8.2f} GiB"
        hbm = g(self.hbm_bytes_per_device) if self.hbm_bytes_per_device else "       n/a"
        fits = {True: "fits", False: "DOES NOT FIT", None: "n/a"}[self.fits]
        at_peak = f"{self.seconds_at_peak:.3g} s" if self.seconds_at_peak is not None else "n/a"
        return "\n".join([
            f"{self.program} ({self.topology}, mesh {self.mesh}, batch {self.batch}, {self.seq_len:,} tokens)",
            f"  arguments   {g(self.argument_bytes_per_device)} per device",
            f"  outputs     {g(self.output_bytes_per_device)}   (aliased {g(self.alias_bytes_per_device).strip()})",
            f"  temporaries {g(self.temp_bytes_per_device)}",
            f"  peak        {g(self.peak_bytes_per_device)} of {hbm.strip()} HBM: {fits}",
            *([] if self.kv_cache_bytes_per_device is None else
              [f"  KV cache    {g(self.kv_cache_bytes_per_device)} per device (a pool of "
               f"{self.kv_cache_tokens:,} tokens shared by the batch)"]),
            f"  FLOPs       {self.model_flops:.3e} in all ({at_peak} at the chips' peak); XLA cost analysis "
            f"{self.flops:.3e} per device, loop bodies counted once",
        ])


def chip_of(topology: str) -> str | None:
    m = re.match(r"(v\d+[a-z]?)", topology)
    return m.group(1) if m else None


TOPOLOGY_FORMS = "v5e:2x4, v6e:2x2, v4:2x2x1, v5p:2x2x1"


def topology_devices(topology: str):
    if topology == "local":
        return jax.devices()
    import importlib.util

    shape = re.fullmatch(r"(v\d+[a-z]?):\d+(x\d+){1,2}", topology)
    if shape is None or shape.group(1) not in CHIPS:
        wrong = (f"unknown chip {chip_of(topology)!r}" if shape else "not of the form CHIP:SHAPE")
        raise ValueError(f"TPU topology {topology!r}: {wrong}; CHIP is one of {', '.join(CHIPS)}, SHAPE the chips "
                         f"along each axis, e.g. {TOPOLOGY_FORMS} (or 'local': this machine's devices)")
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"TPU topology {topology!r} needs libtpu: install the [tpu] extra (pip install 'glm-jax[tpu]')")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu refuses the shape, or cannot start
        raise ValueError(f"libtpu refused TPU topology {topology!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"known forms: {TOPOLOGY_FORMS}") from None


def layout_for(topology: str, mesh: str | None, weights_over_sequence: bool | None) -> tuple[Layout, str]:
    devices = topology_devices(topology)
    default_mesh, default_over = DEFAULT_MESH.get(chip_of(topology) or "", ("sequence=-1", False))
    spec = mesh or default_mesh
    over = default_over if weights_over_sequence is None else weights_over_sequence
    layout = Layout.create(make_mesh(spec, devices), weights_over_sequence=over)
    resolved = ",".join(f"{a}={n}" for a, n in layout.mesh.shape.items() if n > 1) or "single device"
    return layout, resolved + (" (+weights over sequence)" if over else "")


def abstract_inputs(config: GLMConfig, layout: Layout, batch: int, length: int, dtype,
                    kv_cache_dtype: str | None = None, kv_cache_tokens: int | None = None,
                    page_size: int = PAGE_SIZE, quantize: str | None = None):
    """ShapeDtypeStructs (with shardings) for the weights (quantized as `quantize` asks) and an empty
    cache: a pool of `kv_cache_tokens` slots (default batch x length) and `batch` page tables of
    `length` tokens."""
    graphdef, abstract = nnx.split(abstract_model(config, dtype))
    stored = stored_specs(param_specs(config, dtype), Quantization.parse(quantize))
    weights = assemble({n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=layout.sharding(s.axes, s.shape))
                        for n, s in stored.items()})
    flat = [(path, var.replace(weights[".".join(map(str, path))])) for path, var in nnx.to_flat_state(abstract)]
    state = nnx.from_flat_state(flat)
    n = page_devices(layout)
    width = table_width(length, page_size, n)
    pages = pool_pages(kv_cache_tokens or batch * width * page_size, page_size, n)
    return graphdef, state, abstract_cache(config, layout, batch, width, pages, page_size,
                                           cache_dtype(kv_cache_dtype, dtype))


def model_flops(config: GLMConfig, batch: int, queries: int, keys: int) -> float:
    """2 x (parameters touched per token) x tokens, plus QK and PV over `keys` keys per query."""
    dense = config.num_params - config.vocab_size * config.hidden_size      # the embedding is a lookup
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * keys
    return batch * queries * (2 * dense + attention)


def _report(name, compiled, topology, mesh, seq_len, batch, chip, layout: Layout, cache, flops) -> ProgramReport:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    hbm, rate = CHIPS.get(chip, (None, None)) if chip else (None, None)
    devices = layout.mesh.devices.size
    kv = None if cache is None else sum(_shard_bytes(x) for x in jax.tree.leaves(cache))
    return ProgramReport(
        program=name, topology=topology, mesh=mesh, seq_len=seq_len, batch=batch,
        argument_bytes_per_device=mem.argument_size_in_bytes, output_bytes_per_device=mem.output_size_in_bytes,
        alias_bytes_per_device=mem.alias_size_in_bytes, temp_bytes_per_device=mem.temp_size_in_bytes,
        peak_bytes_per_device=peak, kv_cache_bytes_per_device=kv, hbm_bytes_per_device=hbm,
        kv_cache_tokens=None if cache is None else cache.num_pages * cache.page_size,
        fits=None if hbm is None else peak <= hbm, flops=xla_flops, model_flops=flops,
        seconds_at_peak=flops / (devices * rate) if rate else None)


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def compile_report(config: GLMConfig, *, topology: str = "local", seq_len: int, batch: int = 1,
                   mesh: str | None = None, chunk: int = 4096, dtype=jnp.bfloat16,
                   weights_over_sequence: bool | None = None, kv_cache_dtype: str | None = None,
                   kv_cache_tokens: int | None = None, page_size: int = PAGE_SIZE,
                   kernel: str = DEFAULT_KERNEL, quantize: str | None = None) -> list[ProgramReport]:
    """Compiles the engine's own programs (`engine.programs.programs_for`, attention `kernel`) for
    `batch` requests of up to `seq_len` tokens over a page pool of `kv_cache_tokens` slots (default
    batch x seq_len): one prefill chunk (of one request, as the engine prefills) and one decode
    step of every request; reports both.
    kv_cache_dtype: None (the weights' dtype) or "int8".
    quantize: None (float weights), "int8", "int4" or "KIND:G": the layers' projections quantized.

    The prefill of a `seq_len` prompt is seq_len / chunk runs of the first program, so its
    FLOPs here are one chunk's (attending to the whole cache: the last, costliest chunk)."""
    layout, mesh_desc = layout_for(topology, mesh, weights_over_sequence)
    chip = chip_of(topology)
    graphdef, state, cache = abstract_inputs(config, layout, batch, seq_len, dtype, kv_cache_dtype, kv_cache_tokens,
                                             page_size, quantize)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    kernel = resolve_kernel(kernel, layout.mesh.devices.flat[0].platform)
    programs = programs_for(config, graphdef, layout, kernel, batch, cache.pages.shape[1], cache.num_pages,
                            page_size, cache.k[0].dtype)
    compiled = programs.prefill.lower(state, cache, i32(), i32(1, chunk), i32(1, chunk),
                                      jax.ShapeDtypeStruct((1, chunk), jnp.bool_)).compile()
    weights = f", {Quantization.parse(quantize)} weights" if quantize else ""
    reports = [_report(f"prefill chunk ({chunk} tokens{weights})", compiled, topology, mesh_desc, seq_len, batch, chip,
                       layout, cache, model_flops(config, 1, chunk, seq_len))]
    rows = jax.eval_shape(programs.init_rows)
    compiled = programs.decode.lower(state, cache, rows, jax.ShapeDtypeStruct((batch,), jnp.bool_), i32(batch),
                                     steps=1).compile()
    reports.append(_report(f"decode step{weights and ' (' + weights[2:] + ')'}", compiled, topology, mesh_desc,
                           seq_len, batch, chip, layout, cache,
                           model_flops(config, batch, 1, min(seq_len, cache.num_pages * page_size // batch))))
    return reports



def train_report(config: GLMConfig, *, topology: str = "local", seq_len: int, batch: int = 1,
                 mesh: str | None = None, lora_rank: int | None = None, remat: str = DEFAULT_REMAT,
                 loss_chunk: int = LOSS_CHUNK, dtype=jnp.bfloat16, fence: bool = True) -> ProgramReport:
    """Compiles one train step (AdamW, gradient clipping) of `batch` sequences of `seq_len` tokens:
    every weight with float32 master weights and optimizer state, or LoRA adapters of `lora_rank`
    on the frozen weights. Default mesh: every chip on `sequence`, weights and optimizer state
    sharded over all of them (FSDP-style); tokens zigzag over `sequence`, ring attention."""
    from .train.lora import LoRAConfig, trainable_and_frozen
    from .train.step import Batch, OptimizerConfig, Trainer, make_optimizer

    layout, mesh_desc = layout_for(topology, mesh or "sequence=-1", True)
    specs = param_specs(config, dtype)
    weights = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=layout.sharding(s.axes, s.shape))
               for n, s in specs.items()}
    lora = LoRAConfig(lora_rank, 2.0 * lora_rank) if lora_rank else None
    trainable, frozen = trainable_and_frozen(lora, weights, specs, jax.random.key(0), layout.mesh, abstract=True)
    trainer = Trainer(config, layout, dtype, make_optimizer(OptimizerConfig()), remat=remat,
                      loss_chunk=loss_chunk, lora=lora, fence=fence)
    init = jax.jit(trainer.init).lower(trainable).compile()
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         jax.eval_shape(trainer.init, trainable), init.output_shardings)
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    step = jax.jit(trainer.step, donate_argnums=(0,))
    compiled = step.lower(state, frozen, Batch(tokens, tokens, tokens, tokens)).compile()
    kind = f"LoRA rank {lora_rank}" if lora else "full fine-tuning"
    name = f"train step ({kind}, remat {remat}{'' if fence else ', no gradient fence'})"
    return _report(name, compiled, topology, mesh_desc, seq_len, batch,
                   chip_of(topology), layout, None, 3 * model_flops(config, batch, seq_len, (seq_len + 1) / 2))
