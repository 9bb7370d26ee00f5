"""scripts/bench_paged.py's operations: what each side runs, in the benchmark's process (the paged
engine of this tree) or in a worker on the baseline's glm_jax (the row engine), by name through
_bench.Local / _bench.Worker. glm_jax is imported inside each, so a worker's PYTHONPATH decides
which tree's engine runs."""

from __future__ import annotations

import time

import numpy as np

MODELS, ENGINES = {}, {}


def op_load(folder: str, prefill_chunk: int) -> dict:
    import jax

    import glm_jax
    import glm_jax.engine.scheduler

    MODELS["base"] = glm_jax.load(folder, prefill_chunk=prefill_chunk)
    return {"glm_jax": glm_jax.__file__, "scheduler": glm_jax.engine.scheduler.__file__, "jax": jax.__version__}


def op_engine(key: str, max_batch: int, max_model_len: int, steps_per_call: int, pool: dict | None = None,
              warm: bool = False) -> dict:
    """A serving engine under `key` (pool: the paged tree's page_size / kv_cache_tokens, same weights)."""
    model = MODELS["base"]
    if pool:
        from glm_jax.api import Model

        model = Model(model.config, model.graphdef, model.state, layout=model.layout, path=model.path,
                      prefill_chunk=model.prefill_chunk, kernel=model.kernel, **pool)
    ENGINES.pop(key, None)
    engine = ENGINES[key] = model.engine(max_batch=max_batch, max_model_len=max_model_len,
                                         steps_per_call=steps_per_call)
    if warm:
        engine.warm_up()
    c = engine.cache
    slots = c.num_pages * c.page_size if hasattr(c, "num_pages") else int(np.prod(c.index.shape))
    return {"kv_bytes": sum(a.nbytes for a in (*c.k, *c.v, *c.k_scale, *c.v_scale)), "slots": slots,
            "max_batch": max_batch, "max_model_len": max_model_len, "steps_per_call": steps_per_call}


def op_drop(prefix: str) -> None:
    for key in [k for k in ENGINES if k.startswith(prefix)]:
        del ENGINES[key]


def _params(new: int):
    from glm_jax.engine import SamplingParams

    return SamplingParams(new, temperature=0.0, stop_ids=())


def op_serve(key: str, prompts: list, new: int) -> dict:
    """Every prompt submitted at once; per step: seconds, requests running during it, pages used."""
    engine = ENGINES[key]
    engine.forget()
    before, start = engine.stats(), time.perf_counter()
    requests = [engine.submit(p, _params(new)) for p in prompts]
    steps, finished, busy = [], 0, True
    while busy:
        t = time.perf_counter()
        busy = engine.step()
        seconds, stats = time.perf_counter() - t, engine.stats()
        done = sum(r.finish_reason is not None for r in requests)
        steps.append([seconds, stats["running"] + done - finished, stats.get("pages_used")])
        finished = done
    wall, after = time.perf_counter() - start, engine.stats()
    return {"wall_s": wall, "steps": steps, "ttft_s": [r.ttft for r in requests],
            "outputs": [r.output for r in requests], "cached": [r.cached for r in requests],
            "finish": [r.finish_reason for r in requests],
            "delta": {k: after[k] - before[k] for k in ("preemptions", "prefix_hits", "prefix_queries", "evictions")
                      if k in after}}


def op_alone(key: str, prompts: list) -> list[float]:
    """Each prompt alone to its first token (prefill and one step), nothing reused."""
    engine, out = ENGINES[key], []
    for p in prompts:
        start = time.perf_counter()
        engine.generate([p], max_new_tokens=1, temperature=0.0, stop_ids=(), reuse=False)
        out.append(time.perf_counter() - start)
    return out


def op_step_time(key: str, rows: int, prompt_len: int, timed: int, seed: int) -> dict:
    """Seconds per decode step at `rows` rows: once every row decodes, `timed` tokens a row."""
    engine = ENGINES[key]
    engine.forget()
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size
    requests = [engine.submit(rng.integers(0, vocab, prompt_len).tolist(),
                              _params(engine.max_model_len - prompt_len)) for _ in range(rows)]
    while engine.stats()["waiting"] or not all(r.output for r in requests):
        engine.step()
    engine.step()
    engine.step()                                       # full bursts, their programs compiled
    first, start = len(requests[0].output), time.perf_counter()
    while len(requests[0].output) - first < timed:
        engine.step()
    seconds, tokens = time.perf_counter() - start, len(requests[0].output) - first
    whole = all(r.finish_reason is None for r in requests) and engine.stats()["running"] == rows
    for r in requests:
        engine.cancel(r)
    while engine.step():
        pass
    return {"rows": rows, "step_s": seconds / tokens, "tokens": tokens, "all_rows_ran": whole}


def op_decode(key: str, prompt: list, new: int) -> dict:
    """One request; tokens/s after its first burst, from the on_tokens timestamps."""
    engine, bursts = ENGINES[key], []
    request = engine.submit(prompt, _params(new), lambda r, ids: ids and bursts.append((time.perf_counter(), len(ids))))
    while engine.step():
        pass
    later = sum(n for _, n in bursts[1:])
    span = bursts[-1][0] - bursts[0][0]
    return {"ttft_s": request.ttft, "cached": request.cached, "tokens": request.output, "bursts": len(bursts),
            "decode_tokens_per_s": later / span if span > 0 else None}


def op_prefix(key: str, system: list, questions: list, new: int) -> dict:
    engine = ENGINES[key]
    engine.forget()
    page, requests, peak = engine.page_size, [], None

    def step():
        nonlocal peak
        busy, stats = engine.step(), engine.stats()
        held = [r for r in requests if r.finish_reason is None and r.prefilled]
        unshared = sum(-(-(r.prompt_len + len(r.output)) // page) for r in held)
        if peak is None or stats["pages_used"] > peak["pages_used"]:
            peak = {k: stats[k] for k in ("pages_used", "pages_cached", "running")} | {"pages_unshared": unshared}
        return busy

    for q in questions:
        requests.append(engine.submit(system + q, _params(new)))
        while not requests[-1].output and step():
            pass
    while step():
        pass
    return {"ttft_s": [r.ttft for r in requests], "cached": [r.cached for r in requests], "peak": peak,
            "system_pages": len(system) // page, "stats": engine.stats()}


OPS = {name[3:]: f for name, f in globals().items() if name.startswith("op_")}
