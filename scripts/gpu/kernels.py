"""Sections products (each weight product of a decode step alone) and decode_kernel (the Pallas
decode attention against XLA's tiles)."""

from __future__ import annotations

import functools
import gc
import statistics

from _bench import timings
from gpu.bench import GPU, XLA, Bench, log, measure, random_ids, ratio


def decode_products(config) -> dict[str, tuple[int, int]]:
    """The weight matrices a decode step multiplies by, as [N, K] (torch's [out, in])."""
    h, f, q = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_up_proj": (2 * f, h),
            "down_proj": (h, f), "lm_head": (config.vocab_size, h)}


def seconds_per_product(x, w, repeats: int = 50) -> float:
    """Seconds of one x [1, K] @ w [N, K]^T (float32 accumulation, as the model's dense layers):
    `repeats` dependent products in one program (each x depends on the last result, so none is
    hoisted or skipped; the dependency adds one tiny kernel per product), divided; median of 5."""
    import jax
    import jax.numpy as jnp

    def chain(x, w):
        def body(_, s):
            xi = (x.astype(jnp.float32) + 0.0 * s).astype(x.dtype)
            return jnp.einsum("mk,nk->mn", xi, w, preferred_element_type=jnp.float32)[0, 0]
        return jax.lax.fori_loop(0, repeats, body, jnp.float32(0))

    f = jax.jit(chain)
    f(x, w).block_until_ready()
    return statistics.median(t / repeats for t in timings(lambda: f(x, w).block_until_ready(), 5))


def section_products(bench: Bench) -> dict:
    import jax
    import jax.numpy as jnp

    bench.need_model()
    copy = bench.device().get("copy_bytes_per_s")
    out, per_step = {}, 0.0
    for name, (n, k) in decode_products(bench.config).items():
        key = "lm_head" if name == "lm_head" else next(a for a in bench.arrays if a.startswith("layers.0.")
                                                       and a.endswith(name))
        w = bench.arrays[key].reshape(n, k)
        seconds = seconds_per_product(jax.random.normal(jax.random.key(3), (1, k), jnp.bfloat16), w)
        per_step += seconds * (1 if name == "lm_head" else bench.config.num_layers)
        out[name] = {"shape": [n, k], "bytes": w.nbytes, "seconds": seconds, "gb_per_s": w.nbytes / seconds / 1e9,
                     "of_copy_bandwidth": ratio(w.nbytes / seconds, copy)}
    step = (bench.results.get("context_1k") or {}).get("decode_seconds_per_token")
    return {"products": out, "per_step_seconds": per_step, "context_1k_step_seconds": step,
            "rest_seconds": None if step is None else step - per_step}


def attention_call_seconds(attend, q, q_pos, k, v, table, repeats: int = 50) -> float:
    """Seconds of one decode attention call (`cache_ops`' attend): `repeats` dependent calls in
    one program (each query depends on the last output), divided; median of 5."""
    import jax

    def chain(q):
        body = lambda _, x: attend(x, q_pos, k, v, table).astype(x.dtype) * 0.5 + q
        return jax.lax.fori_loop(0, repeats, body, q)

    f = jax.jit(chain)
    f(q).block_until_ready()
    return statistics.median(t / repeats for t in timings(lambda: f(q).block_until_ready(), 5))


def section_decode_kernel(bench: Bench) -> dict:
    """The decode step's attention: the paged Pallas kernel that the GPU kernel ("auto" on a GPU)
    uses for one token a row, against XLA's tiles. Per case (the 1K and 32K contexts' filled
    slots, prompt + 1 + N/2, and the int8 cache at 32K): one layer's attention call alone (one row,
    the model's heads, a pool of the row's pages of PAGE_SIZE slots in shuffled order, bf16 or
    int8 with random scales), microseconds
    and the largest difference from XLA's output and from a float32 reference (the XLA kernel on
    float32 copies of the values the cache holds). Then the decode through an Engine with the XLA
    kernel (its prefill too, untimed here) against this run's context_1k, context_32k and int8_32k,
    where they ran (greedy tokens are not compared: the two prefill kernels' bf16 logits part at
    the first token on random weights)."""
    import jax
    import jax.numpy as jnp

    from glm_jax.attention import normalized, ungroup
    from glm_jax.engine import Engine
    from glm_jax.engine.cache import cache_ops, table_width
    from glm_jax.kernels.decode_pallas import paged_decode
    from glm_jax.options import PAGE_SIZE

    bench.need_model()
    c, layout = bench.config, bench.layout
    g, hq, d = c.num_kv_heads, c.num_heads, c.head_dim
    cases = {"context_1k": ("context_1k", None), "context_32k": ("context_32k", None),
             "int8_32k": ("context_32k", "int8")}
    f32 = lambda x: x.astype(jnp.float32)
    out: dict = {"page_size": PAGE_SIZE, "attention": {}}
    interpret = layout.mesh.devices.flat[0].platform != "gpu"   # off GPUs, Pallas' interpreter runs it

    def pallas(q, q_pos, k, v, table, k_scale=None, v_scale=None):   # the engine's decode kernel, one device
        return ungroup(normalized(paged_decode(q, q_pos + 1, k, v, table, k_scale, v_scale, interpret=interpret)),
                       q.dtype)

    for name, (context, dtype) in cases.items():
        prompt, new = bench.scale.contexts[context]
        filled = prompt + 1 + new // 2
        pages = table_width(prompt + new, PAGE_SIZE, 1)
        shape = (g, pages, PAGE_SIZE, d)
        keys = jax.random.split(jax.random.key(7), 6)
        q = jax.random.normal(keys[2], (1, 1, hq, d), jnp.bfloat16)
        if dtype == "int8":
            k, v = (jax.random.randint(key, shape, -127, 128, jnp.int8) for key in keys[:2])
            scales = tuple(jax.random.uniform(key, shape[:-1], jnp.float32, 0.5, 1.5) / 127 for key in keys[3:5])
            held = tuple(f32(x) * s[..., None] for x, s in zip((k, v), scales))
        else:
            k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:2])
            scales, held = (), (f32(k), f32(v))
        table = jax.random.permutation(keys[5], pages).astype(jnp.int32)[None]         # the row's pages, scattered
        q_pos = jnp.full((1, 1), filled - 1, jnp.int32)
        kernels = {XLA: cache_ops(layout, kernel=XLA)[1], GPU: pallas}
        got = {kernel: f32(jax.jit(attend)(q, q_pos, k, v, table, *scales)) for kernel, attend in kernels.items()}
        reference = jax.jit(kernels[XLA])(f32(q), q_pos, *held, table)
        seconds = {kernel: attention_call_seconds(functools.partial(attend, k_scale=scales[0], v_scale=scales[1])
                                                  if scales else attend, q, q_pos, k, v, table)
                   for kernel, attend in kernels.items()}
        out["attention"][name] = {
            "filled_slots": filled, "cache_slots": pages * PAGE_SIZE, "cache_dtype": dtype or "bfloat16",
            "microseconds": {"xla": seconds[XLA] * 1e6, "pallas": seconds[GPU] * 1e6},
            "speedup": seconds[XLA] / seconds[GPU],
            "max_abs_pallas_vs_xla": float(jnp.abs(got[GPU] - got[XLA]).max()),
            "max_abs_pallas_vs_float32": float(jnp.abs(got[GPU] - reference).max()),
            "max_abs_xla_vs_float32": float(jnp.abs(got[XLA] - reference).max())}
        log(f"decode_kernel {name}: {out['attention'][name]}")
    engines: dict = {}
    for name, (context, dtype) in cases.items():
        mine = bench.results.get(name) or {}
        if "decode_seconds_per_token" not in mine:
            continue                                   # compared with a section of this run only
        if dtype not in engines:
            engines[dtype] = Engine(c, bench.graphdef, bench.state, layout, prefill_chunk=bench.args.prefill_chunk,
                                    kernel=XLA, kv_cache_dtype=dtype, serving=False)
        prompt, new = mine["prompt_tokens"], mine["new_tokens"]
        ids = random_ids(c.vocab_size, prompt)
        run = lambda n: engines[dtype].generate([ids], max_new_tokens=n, temperature=0, stop_ids=(), reuse=False)[0]
        # XLA's prefill is slow at 32K (each timing call prefills): fewer repeats there
        t1, tn, _ = measure(run, new, bench.scale.repeats if name == "context_1k" else 2)
        step = (tn - t1) / (new - 1)
        out[f"engine_xla_{name}"] = {"decode_seconds_per_token": step}
        out[f"engine_default_{name}"] = {"decode_seconds_per_token": mine["decode_seconds_per_token"]}
        out[f"decode_speedup_{name}"] = ratio(step, mine["decode_seconds_per_token"])
        log(f"decode_kernel {name}: XLA tiles {step * 1e3:.2f} ms/token, default "
            f"{mine['decode_seconds_per_token'] * 1e3:.2f}")
    del engines
    gc.collect()
    return out
