"""Section longest_fit: the longest context whose prefill chunk and decode step compile within the
device's memory, bf16 and int8 caches."""

from __future__ import annotations

from gpu.bench import GiB, Bench, log


def abstract_cache_bytes(config, length: int, **cache_kwargs) -> int:
    """Bytes of a one-request cache of `length` slots on one device: a pool of the request's pages
    of PAGE_SIZE slots (K/V, int8 scales) and its page table."""
    import jax
    import jax.numpy as jnp

    from glm_jax.engine import abstract_cache, cache_dtype
    from glm_jax.engine.cache import table_width
    from glm_jax.options import PAGE_SIZE
    from glm_jax.sharding import Layout, make_mesh

    layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    pages = table_width(length, PAGE_SIZE, 1)
    cache = abstract_cache(config, layout, 1, pages, pages, PAGE_SIZE,
                           cache_dtype(cache_kwargs.get("kv_cache_dtype"), jnp.bfloat16))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def fit_search(bench: Bench, limit: int, **cache_kwargs) -> dict:
    """The longest multiple of fit_unit (up to fit_cap) whose prefill chunk and decode step fit."""
    import jax.numpy as jnp

    from glm_jax.compile_report import compile_report

    scale, chunk = bench.scale, bench.args.prefill_chunk
    compiles = []

    def peaks(length: int) -> dict:
        log(f"  compile_report at {length:,} tokens {cache_kwargs or ''}")
        prefill, decode = compile_report(bench.config, topology="local", seq_len=length, chunk=chunk,
                                         dtype=jnp.bfloat16, **cache_kwargs)
        row = {"seq_len": length, "prefill_chunk_peak_bytes": prefill.peak_bytes_per_device,
               "decode_peak_bytes": decode.peak_bytes_per_device,
               "kv_cache_bytes": decode.kv_cache_bytes_per_device}
        row["fits"] = max(row["prefill_chunk_peak_bytes"], row["decode_peak_bytes"]) <= limit
        compiles.append(row)
        return row

    # First guess from arithmetic: the memory the weights leave (less 3% for temporaries) over the
    # cache's bytes per token. A guess that does not fit is lowered by a conservative line (all
    # but the weights taken as growing with the length); one that fits is the answer, with the
    # room it leaves. One compile pair in the usual case, at most four.
    weights = 2 * bench.config.num_params
    per_token = abstract_cache_bytes(bench.config, 65536, **cache_kwargs) / 65536
    unit, cap = scale.fit_unit, scale.fit_cap
    guess = (limit * 0.97 - weights) / per_token
    result = {"predicted_tokens": guess, "cache_bytes_per_token": per_token, "compiles": compiles}
    longest = None
    for _ in range(4):
        length = min(cap, int(guess // unit) * unit)
        if length < unit:
            break
        if bench.left() <= 0:
            result["stopped"] = "budget"
            break
        row = peaks(length)
        peak = max(row["prefill_chunk_peak_bytes"], row["decode_peak_bytes"])
        if row["fits"]:
            longest = length
            result["room_bytes"] = limit - peak
            break
        guess = min(length - unit, length * (limit - weights) / (peak - weights))
    return {**result, "longest_tokens": longest, "fits_1m": longest is not None and longest >= 1048576}


def section_longest_fit(bench: Bench) -> dict:
    import jax

    config = bench.config
    limit = bench.scale.memory_limit or (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        raise RuntimeError("the device reports no memory limit (memory_stats()['bytes_limit'])")
    million = 1048576
    shape = (f"{config.num_layers} layers x 2 x {config.num_kv_heads} KV heads x {config.head_dim} x "
             f"{{b}} B x 1,048,576 tokens = {{gib:g}} GiB")
    result = {"memory_limit_bytes": limit,
              "memory_limit_source": "assumed (--small)" if bench.scale.memory_limit else "memory_stats bytes_limit",
              "prefill_chunk": bench.args.prefill_chunk,
              "arithmetic": {"weight_bytes": 2 * config.num_params,
                             "kv_cache_bytes_1m_bf16": config.kv_bytes_per_token(2) * million,
                             "kv_cache_bytes_1m_int8": config.kv_bytes_per_token(1) * million,
                             "bf16": shape.format(b=2, gib=config.kv_bytes_per_token(2) * million / GiB),
                             "int8": shape.format(b=1, gib=config.kv_bytes_per_token(1) * million / GiB)
                             + " (plus scales)"}}
    result["bf16"] = fit_search(bench, limit)
    if bench.left() < bench.scale.cost_s["longest_fit"] / 2:
        result["int8"] = {"skipped": "budget"}
    else:
        result["int8"] = fit_search(bench, limit, kv_cache_dtype="int8")
    return result
