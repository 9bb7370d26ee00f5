"""The summary bench_gpu prints: one line per section, then the goals."""

from __future__ import annotations

from gpu.bench import GiB, SECTION_NAMES


def summary(results: dict) -> str:
    lines = [f"bench_gpu on {results['meta']['device_kind']} ({results['meta']['config']}), "
             f"{results['meta']['elapsed_s']:.0f} s"]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)
    times = lambda x: "n/a" if x is None else f"{x:.2f}x"
    for name in SECTION_NAMES:
        r = results.get(name)
        if r is None or "error" in r or "skipped" in r:
            lines.append(f"  {name:<13} {'not run' if r is None else r.get('error') or 'skipped: ' + r['skipped']}")
        elif name == "device":
            lines.append(f"  {name:<13} copy {r['copy_bytes_per_s'] / 1e9:,.0f} GB/s, bf16 matmul "
                         f"{r['bf16_flops_per_s'] / 1e12:,.1f} TFLOP/s (of datasheet: "
                         f"{fmt(r['copy_of_datasheet'], '.0%')}, {fmt(r['matmul_of_datasheet'], '.0%')})")
        elif name.startswith("context"):
            lines.append(f"  {name:<13} decode {r['decode_tokens_per_s']:,.1f} tok/s = "
                         f"{fmt(r['decode_roofline_fraction'], '.0%')} of roofline; prefill "
                         f"{r['prefill_tokens_per_s']:,.0f} tok/s, MFU {fmt(r['prefill_mfu'], '.0%')}")
        elif name == "transformers":
            lines.append(f"  {name:<13} decode {r['decode_1k']['decode_tokens_per_s']:,.1f} tok/s at 1K "
                         f"(glm-jax {times(r['decode_speedup_1k'])}), prefill 8K "
                         f"{r['prefill_8k']['prefill_tokens_per_s']:,.0f} tok/s "
                         f"(glm-jax {times(r['prefill_speedup_8k'])}), greedy {r.get('greedy_1k')}")
        elif name == "accuracy":
            paths = [f"{k} {v['relative_error']:.1e} top-1 {v['top1_agreement']:.3f}" for k, v in r.items()
                     if isinstance(v, dict) and "relative_error" in v]
            lines.append(f"  {name:<13} logits vs float32: " + "; ".join(paths)
                         + f" (cuDNN as accurate as XLA: {r.get('cudnn_as_accurate_as_xla', 'n/a')})")
        elif name == "longest_fit":
            int8 = r["int8"].get("longest_tokens", r["int8"].get("skipped"))
            lines.append(f"  {name:<13} bf16 cache {fmt(r['bf16']['longest_tokens'], ',')} tokens, int8 {int8} "
                         f"(limit {r['memory_limit_bytes'] / GiB:.3g} GiB)")
        elif name == "prefill_128k":
            lines.append(f"  {name:<13} {r['seconds']:.1f} s, {r['prefill_tokens_per_s']:,.0f} tok/s, MFU "
                         f"{fmt(r['prefill_mfu'], '.0%')}{' (with compilation)' if r['includes_compile'] else ''}")
        elif name == "int8_32k":
            lines.append(f"  {name:<13} decode {r['decode_tokens_per_s']:,.1f} tok/s = "
                         f"{fmt(r['decode_roofline_fraction'], '.0%')} of its roofline, "
                         f"{times(r['decode_speedup_vs_bf16_cache'])} the bf16 cache; greedy "
                         f"{r.get('greedy_vs_bf16_cache')}")
        elif name == "products":
            parts = [f"{k} {v['gb_per_s']:,.0f}" for k, v in r["products"].items()]
            rest = r["rest_seconds"]
            lines.append(f"  {name:<13} GB/s " + ", ".join(parts) + f"; per step {r['per_step_seconds'] * 1e3:.2f} ms"
                         + ("" if rest is None else f" + the rest {rest * 1e3:.2f} ms"))
        elif name == "decode_kernel":
            parts = [f"{k} {v['microseconds']['xla']:.1f} -> {v['microseconds']['pallas']:.1f} us "
                     f"(max diff {v['max_abs_pallas_vs_xla']:.1e})" for k, v in r["attention"].items()]
            decode = [f"{k[11:]} {v['decode_seconds_per_token'] * 1e3:.2f} ms/token "
                      f"(default {times(r['decode_speedup_' + k[11:]])} faster)" for k, v in r.items()
                      if k.startswith("engine_xla")]
            lines.append(f"  {name:<13} attention XLA -> Pallas: " + ", ".join(parts) + "; decode with XLA's tiles: "
                         + ", ".join(decode))
        elif name == "model":
            lines.append(f"  {name:<13} {r['weight_bytes'] / 1e9:.2f} GB bf16 made in {r['build_seconds']:.1f} s")
    t = results["targets"]
    lines.append(f"  targets: decode roofline 1K {fmt(t['decode_roofline_fraction_1k'], '.2f')} (>= 0.85), "
                 f"prefill MFU 32K {fmt(t['prefill_mfu_32k'], '.2f')} (>= 0.55), vs transformers "
                 f"{times(t['decode_vs_transformers_1k'])} (>= 3)")
    return "\n".join(lines)
