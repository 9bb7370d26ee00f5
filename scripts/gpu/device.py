"""Sections device (copy bandwidth, bf16 matmul peak, datasheet figures) and model (every weight
made on the device)."""

from __future__ import annotations

import functools
import math
import statistics
import time

from _bench import timings
from gpu.bench import Bench, datasheet, make_generator, ratio


def section_device(bench: Bench) -> dict:
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    add_one = jax.jit(lambda x: x + 1, donate_argnums=0)           # in place: no fresh buffer per call
    x = [add_one(jnp.zeros(bench.scale.copy_bytes // 4, jnp.float32)).block_until_ready()]

    def copy():
        x[0] = add_one(x[0]).block_until_ready()

    timings(copy, 3)
    copy_s = min(timings(copy, 20))
    copy_bandwidth = 2 * bench.scale.copy_bytes / copy_s            # read + written
    del x
    n, chain = bench.scale.matmul
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = (jax.random.normal(jax.random.key(2), (n, n)) / n ** 0.5).astype(jnp.bfloat16)   # keeps |x| ~ 1
    chained = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda i, x: x @ b, a))
    chained(a, b).block_until_ready()
    matmul_s = statistics.median(timings(lambda: chained(a, b).block_until_ready(), 7))
    peak = 2 * n ** 3 * chain / matmul_s
    sheet = datasheet(dev.device_kind)
    return {"kind": dev.device_kind, "platform": dev.platform, "devices_visible": len(jax.devices()),
            "copy_array_bytes": bench.scale.copy_bytes, "copy_seconds": copy_s,
            "copy_bytes_per_s": copy_bandwidth, "matmul": f"{chain} x bf16 [{n},{n}] @ [{n},{n}]",
            "matmul_seconds": matmul_s, "bf16_flops_per_s": peak, "datasheet": sheet,
            "copy_of_datasheet": ratio(copy_bandwidth, sheet["hbm_bytes_per_s"]),
            "matmul_of_datasheet": ratio(peak, sheet["bf16_flops_per_s"]),
            "memory_stats": dev.memory_stats()}


def section_model(bench: Bench) -> dict:
    import jax
    import jax.numpy as jnp

    from glm_jax.params import param_specs, split_model
    from glm_jax.sharding import Layout, make_mesh

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def fill(seed, shape, ones):
        """Made on the device. Uniform with std 0.02 (the model init's scale) from a hash of each
        element's index and `seed` (jax.random's normal takes seconds to compile per shape)."""
        if ones:
            return jnp.ones(shape, jnp.bfloat16)
        x = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + seed * jnp.uint32(0x9E3779B9)
        x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
        x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
        x = x ^ (x >> 16)
        uniform = (x >> 8).astype(jnp.float32) * 2.0 ** -23 - 1.0                  # [-1, 1)
        return (uniform * (0.02 * 3 ** 0.5)).astype(jnp.bfloat16)

    start = time.perf_counter()
    bench.layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    arrays = {}
    for i, (name, spec) in enumerate(param_specs(bench.config, jnp.bfloat16).items()):
        value = fill(jnp.uint32(i), spec.shape, spec.axes == ("norm",))
        arrays[name] = jax.device_put(value, bench.layout.sharding(spec.axes, spec.shape))
    jax.block_until_ready(arrays)
    bench.arrays = arrays
    bench.graphdef, bench.state = split_model(bench.config, jnp.bfloat16, arrays)
    bench.generator = make_generator(bench)
    stats = jax.devices()[0].memory_stats() or {}
    return {"config": bench.scale.config_name, "glm_config": bench.config.to_dict(),
            "parameters": bench.config.num_params,
            "weight_bytes": sum(a.nbytes for a in arrays.values()), "dtype": "bfloat16",
            "build_seconds": time.perf_counter() - start, "bytes_in_use": stats.get("bytes_in_use")}
