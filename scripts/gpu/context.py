"""Sections context_1k/8k/32k, prefill_128k and int8_32k: the Engine's prefill and decode speed
against the roofline; the kernel trace of one 1K call (--profile)."""

from __future__ import annotations

import json
import os
from typing import Callable

from _bench import decode_bytes, prefill_flops, timings
from gpu.bench import Bench, context_figures, glm_run, log, measure, random_ids, ratio


def section_context(name: str) -> Callable[[Bench], dict]:
    def run(bench: Bench) -> dict:
        bench.need_model()
        prompt, new = bench.scale.contexts[name]
        run = glm_run(bench, random_ids(bench.config.vocab_size, prompt))
        t1, tn, tokens = measure(run, new, bench.scale.repeats)
        bench.tokens[prompt] = tokens
        out = context_figures(bench, prompt, new, t1, tn, first_has_step=True)
        if name == "context_1k" and bench.args.profile:
            out["profile"] = profile(bench, lambda: run(PROFILED_STEPS + 1), bench.args.profile)
        return out

    return run


PROFILED_STEPS = 32


def profile(bench: Bench, call: Callable[[], object], folder: str) -> dict:
    """Kernel time of one traced call (a prefill and PROFILED_STEPS decode steps) from JAX's
    profiler (its Perfetto JSON, kept in `folder`): per compiled program, the kernels run, their
    summed time and the span from the first start to the last end (summed time / span: how busy
    the GPU was); for the decode loop, per step, with its 25 costliest kernels."""
    import glob

    import jax

    if bench.device().get("platform") != "gpu":
        return {"unavailable": f"kernel traces are read on a GPU, not {bench.device().get('platform')}"}
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        call()
    trace = max(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True), key=os.path.getmtime)
    return {"trace": os.path.relpath(trace, folder), **kernel_summary(trace, "GPU")}


def kernel_summary(trace: str, device: str) -> dict:
    """The kernel events of the processes whose name holds `device`, summarised (see `profile`)."""
    import collections
    import gzip

    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if device in name}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
    programs = collections.defaultdict(list)
    for e in kernels:
        args = e.get("args") or {}
        programs[args.get("hlo_module") or args.get("hlo_module_name") or "?"].append(e)
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu}
    per_thread = collections.Counter()
    for e in kernels:
        per_thread[threads.get((e["pid"], e.get("tid")), "?")] += e["dur"]
    streams = {key for key, name in threads.items() if "stream" in name.lower()}
    if streams:   # kernels run on streams; other lines of the device (module or op views) repeat them
        kernels = [e for e in kernels if (e["pid"], e.get("tid")) in streams]
    result = {"processes": sorted(names[p] for p in gpu), "thread_us": dict(per_thread.most_common(12)),
              "events": len(kernels), "programs": {}}
    for module, evs in sorted(programs.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = sum(e["dur"] for e in evs)
        span = max(e["ts"] + e["dur"] for e in evs) - min(e["ts"] for e in evs)
        entry = {"kernels": len(evs), "kernel_us": busy, "span_us": span, "busy_fraction": busy / span if span else None}
        by = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            key = (e["name"][:80], ((e.get("args") or {}).get("hlo_op") or "")[:60])
            by[key][0] += 1
            by[key][1] += e["dur"]
        entry["top"] = [{"kernel": k, "hlo_op": op, "count": n, "us": t}
                        for (k, op), (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]]
        if "decode" in module:
            entry.update(kernels_per_step=len(evs) / PROFILED_STEPS, kernel_us_per_step=busy / PROFILED_STEPS,
                         span_us_per_step=span / PROFILED_STEPS)
        result["programs"][module] = entry
    sample = next((e for e in kernels if e.get("args")), None)
    result["sample_event_args"] = sorted((sample or {}).get("args", {}))
    return result


def section_prefill_128k(bench: Bench) -> dict:
    bench.need_model()
    prompt = bench.scale.huge_prompt
    run = glm_run(bench, random_ids(bench.config.vocab_size, prompt))
    first = timings(lambda: run(1), 1)[0]
    log(f"  first call {first:.1f} s (with compilation)")
    again = bench.left() > first                  # a second call costs less: no compilation
    seconds = timings(lambda: run(1), 1)[0] if again else first
    flops = prefill_flops(bench.config, prompt)
    dev = bench.device()
    return {"prompt_tokens": prompt, "first_call_seconds": first, "seconds": seconds,
            "includes_compile": not again, "includes_one_decode_step": True,
            "prefill_tokens_per_s": prompt / seconds, "prefill_model_flops": flops,
            "prefill_mfu": ratio(flops / seconds, dev.get("bf16_flops_per_s")),
            "prefill_mfu_datasheet": ratio(flops / seconds, dev.get("datasheet", {}).get("bf16_flops_per_s"))}


def section_int8_32k(bench: Bench) -> dict:
    """The int8 KV cache at the 32K context: decode and prefill speed against the bf16 cache's
    (context_32k), and how many of the bf16 cache's greedy tokens it reproduces."""
    from glm_jax.engine import Engine

    bench.need_model()
    gen = Engine(bench.config, bench.graphdef, bench.state, bench.layout, prefill_chunk=bench.args.prefill_chunk,
                 kernel=bench.args.kernel, kv_cache_dtype="int8", serving=False)
    prompt, new = bench.scale.contexts["context_32k"]
    new = min(new, 32)
    ids = random_ids(bench.config.vocab_size, prompt)
    run = lambda n: gen.generate([ids], max_new_tokens=n, temperature=0, stop_ids=(), reuse=False)[0]
    t1, tn, tokens = measure(run, new, bench.scale.repeats)
    result = context_figures(bench, prompt, new, t1, tn, first_has_step=True)
    moved = decode_bytes(bench.config, prompt + 1 + new / 2, kv_itemsize=1)
    result.update(decode_bytes_per_step=moved, decode_roofline_fraction=ratio(
        moved / result["decode_seconds_per_token"], bench.device().get("copy_bytes_per_s")))
    bf16 = bench.results.get("context_32k") or {}
    result["decode_speedup_vs_bf16_cache"] = ratio(bf16.get("decode_seconds_per_token"),
                                                   result["decode_seconds_per_token"])
    ours = bench.tokens.get(prompt)
    if ours is not None:
        same = [a == b for a, b in zip(tokens, ours)]
        result["greedy_vs_bf16_cache"] = {"compared": len(same), "leading_identical": (same + [False]).index(False)}
    return result
