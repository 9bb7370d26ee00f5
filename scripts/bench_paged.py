#!/usr/bin/env python3
"""Issue #28's figures: the paged KV cache (this tree) against the row engine (the commit before
it) in one run, interleaved round by round.

  python scripts/bench_paged.py [--parts concurrency,prefix,decode,page_size] [--baseline 272279a]
                                [--rounds 3] [--contexts 16384,61440] [--small] [--json] [--out FILE]

Sides: the paged engine runs in this process; the row engine in a worker subprocess started from the
--baseline tree with PYTHONPATH set to it (a commit is extracted with `git archive` into a temporary
folder; a folder is used as is; `self` runs this tree's engine in this process with the row engine's
settings: for the tests). The JSON records the files each side imported. Both load one model folder:
the 162M long-context model of bench_long.py (same config and weights: write_random_checkpoint seed 0,
converted once), float32, prefill_chunk 512. Prompts are random token ids, greedy, no stop ids.

Parts (--parts):
- concurrency: 64 requests, all submitted at t=0; prompts from a seeded long-tailed mix (60 log-uniform
  in 256-2048 tokens, 4 of 16,384, shuffled); 64 new tokens each; steps_per_call 4. Row engine:
  max_batch 2, max_model_len 16,448; paged: max_batch 64, page 128, a pool of as many slots as the row
  engine's cache holds (kv_bytes shows the two equal). Each round runs the workload on both (order
  alternating) after forget(). Requests running at once: after every step(), the requests holding a
  row plus those that finished during it, weighted by the step's time (mean) and the largest (max).
  Output tokens/s: 64 x 64 / the wall time from the first submit to the end. TTFT: Request.ttft.
  Bound: b = the paged runs' mean concurrency (rounded); a decode step at b rows and at one row (an
  engine of max_batch b: driven step by step once every row decodes, time / tokens) and every prompt's
  prefill alone (P, to its first token); at best P + 64 x 63 / b steps of b rows: bound tokens/s.
  FCFS floor: the prefill-alone times of the prompts up to the median one, summed: no first-come-
  first-served engine gives the median request its first token sooner.
- prefix: 32 users, a shared 4,096-token system prompt + 32 distinct tokens each, 16 new tokens
  (paged only, max_batch 32). User 0 runs alone to its first token; each next user is submitted when
  the previous one got its first token (earlier ones keep decoding). TTFT of each against user 0's;
  pages_used at its peak against the pages the running requests would hold unshared.
- decode: one request at each --contexts length, 33 new tokens, steps_per_call 8, an engine of
  max_batch 1 per side. The first run prefills (its TTFT is reported, compilation included); each next
  run resubmits the prompt (its K/V reused by both engines) and is timed: tokens/s = tokens after the
  first burst / time from the first burst's callback to the last (on_tokens timestamps).
- page_size: paged only, pages of 64, 128, 256 (same weights): decode tokens/s at 16,384 as above, and
  the TTFT of a fresh 4,096-token prompt (prefill and one step) each round.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _bench import LONG_MODEL, Local, Worker, long_model_config, serve_ops  # noqa: E402
from _paged_ops import OPS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("concurrency", "prefix", "decode", "page_size")
FULL = dict(model=LONG_MODEL, prefill_chunk=512, requests=64, new=64, short=(256, 2048), long=16384, longs=4,
            rows=2, page=128, max_batch=64, burst=4, timed=32, users=32, system=4096, question=32, prefix_new=16,
            contexts=(16384, 61440), decode_new=33, decode_burst=8, page_sizes=(64, 128, 256), prefill=4096,
            page_context=16384, warm=True)
# --small: the tests' (bookkeeping, not speed): no warm-up, so TTFTs include compilation
SMALL = dict(model=dict(layers=1, hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=64, vocab=1024), prefill_chunk=32,
             requests=10, new=6, short=(16, 64), long=128, longs=2, rows=2, page=16, max_batch=8, burst=4, timed=8,
             users=4, system=64, question=8, prefix_new=4, contexts=(100,), decode_new=9, decode_burst=4,
             page_sizes=(8, 16, 32), prefill=48, page_context=100, warm=False)

# -- the parts ----------------------------------------------------------------------------------------

def mix(cfg: dict, seed: int = 0) -> list[list[int]]:
    """The concurrency workload: long-tailed prompt lengths (log-uniform short ones, a few long), shuffled."""
    rng = np.random.default_rng(seed)
    lo, hi = cfg["short"]
    n = cfg["requests"] - cfg["longs"]
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int).tolist() + [cfg["long"]] * cfg["longs"]
    rng.shuffle(lengths)
    return [rng.integers(0, cfg["model"]["vocab"], n).tolist() for n in lengths]


def summary(run: dict, new: int) -> dict:
    seconds, running = np.array([s[0] for s in run["steps"]]), np.array([s[1] for s in run["steps"]])
    tokens = sum(map(len, run["outputs"]))
    return {"running_mean": float((seconds * running).sum() / seconds.sum()), "running_max": int(running.max()),
            "output_tokens": tokens, "complete": tokens == new * len(run["outputs"]), "wall_s": run["wall_s"],
            "output_tokens_per_s": tokens / run["wall_s"], "ttft_p50_s": float(np.percentile(run["ttft_s"], 50)),
            "ttft_p99_s": float(np.percentile(run["ttft_s"], 99)), "preemptions": run["delta"].get("preemptions", 0),
            "prefix_hit_pages": run["delta"].get("prefix_hits", 0), "cached_tokens": sum(run["cached"]),
            "steps": len(run["steps"])}


def mean_of(rounds: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in rounds) for k in rounds[0] if isinstance(rounds[0][k], (int, float))}


def part_concurrency(paged, row, cfg: dict, rounds: int) -> dict:
    prompts, new = mix(cfg), cfg["new"]
    length = cfg["long"] + new
    engines = {"row": row("engine", key="row/c", max_batch=cfg["rows"], max_model_len=length,
                          steps_per_call=cfg["burst"], warm=cfg["warm"])}
    pool = {"page_size": cfg["page"], "kv_cache_tokens": engines["row"]["slots"]}
    engines["paged"] = paged("engine", key="paged/c", max_batch=cfg["max_batch"], max_model_len=length,
                             steps_per_call=cfg["burst"], pool=pool, warm=cfg["warm"])
    sides, runs, outputs = {"row": row, "paged": paged}, {"row": [], "paged": []}, {"row": [], "paged": []}
    for i in range(rounds):
        for name in ("row", "paged") if i % 2 == 0 else ("paged", "row"):
            run = sides[name]("serve", key=f"{name}/c", prompts=prompts, new=new)
            runs[name].append(summary(run, new))
            outputs[name].append(run["outputs"])
            x = runs[name][-1]
            print(f"  concurrency round {i + 1} {name}: running {x['running_mean']:.2f}, "
                  f"{x['output_tokens_per_s']:.1f} tok/s, ttft p50 {x['ttft_p50_s']:.2f} s", file=sys.stderr)
    row("drop", prefix="row/c")
    means = {name: mean_of(r) | {"running_max": max(x["running_max"] for x in r)} for name, r in runs.items()}
    b = max(1, round(means["paged"]["running_mean"]))
    alone = paged("alone", key="paged/c", prompts=prompts)
    paged("drop", prefix="paged/c")
    median = int(np.median([len(p) for p in prompts]))
    margin = cfg["burst"] * (b * -(-median // cfg["prefill_chunk"]) + 4) + cfg["timed"] + 8
    paged("engine", key="paged/bound", max_batch=b, max_model_len=median + margin, steps_per_call=cfg["burst"])
    step1, stepb = (paged("step_time", key="paged/bound", rows=r, prompt_len=median, timed=cfg["timed"], seed=r)
                    for r in (1, b))
    paged("drop", prefix="paged/bound")
    n = len(prompts)
    bound_s = sum(alone) + n * (new - 1) * stepb["step_s"] / b
    bound = {"rows": b, "prompt_len": median, "step_1": step1, f"step_{b}": stepb, "prefill_alone_s": sum(alone),
             "decode_only_gain": b * step1["step_s"] / stepb["step_s"], "bound_s": bound_s,
             "bound_output_tokens_per_s": n * new / bound_s}
    bound["paged_fraction_of_bound"] = means["paged"]["output_tokens_per_s"] / bound["bound_output_tokens_per_s"]
    # first come, first served: the request at the median cannot see its first token before every prompt
    # up to it is prefilled (prefill is compute-bound), whatever the engine
    bound["fcfs_ttft_p50_floor_s"] = float(np.cumsum(alone)[(n + 1) // 2 - 1])
    bound["fcfs_floor_over_row_ttft_p50"] = bound["fcfs_ttft_p50_floor_s"] / means["row"]["ttft_p50_s"]
    same = [sum(u == v for u, v in zip(x, y)) for x, y in zip(outputs["row"], outputs["paged"])]
    return {"workload": {"requests": n, "new_tokens": new, "arrivals": "all submitted at t=0",
                         "prompt_tokens": [len(p) for p in prompts]},
            "engines": engines, "rounds": runs, "mean": means,
            "ratios": {k[:-2] if k.startswith("ttft") else k: means["paged"][k] / means["row"][k]
                       for k in ("running_mean", "ttft_p50_s", "ttft_p99_s", "output_tokens_per_s")},
            "bound": bound, "greedy_identical_requests": same,
            "deterministic": {k: all(o == v[0] for o in v) for k, v in outputs.items()}}


def part_prefix(paged, row, cfg: dict, rounds: int) -> dict:
    rng = np.random.default_rng(1)
    vocab = cfg["model"]["vocab"]
    system = rng.integers(0, vocab, cfg["system"]).tolist()
    questions = [rng.integers(0, vocab, cfg["question"]).tolist() for _ in range(cfg["users"])]
    length = cfg["system"] + cfg["question"] + cfg["prefix_new"]
    engine = paged("engine", key="paged/p", max_batch=cfg["users"], max_model_len=length, steps_per_call=cfg["burst"],
                   pool={"page_size": cfg["page"]}, warm=cfg["warm"])
    run = paged("prefix", key="paged/p", system=system, questions=questions, new=cfg["prefix_new"])
    paged("drop", prefix="paged/p")
    first, rest = run["ttft_s"][0], run["ttft_s"][1:]
    return {"engine": engine, **run, "ttft_ratio_median": statistics.median(rest) / first,
            "ttft_ratio_max": max(rest) / first}


def part_decode(paged, row, cfg: dict, rounds: int) -> dict:
    out, new = [], cfg["decode_new"]
    sides = {"paged": paged, "row": row}
    for context in cfg["contexts"]:
        prompt = np.random.default_rng(context).integers(0, cfg["model"]["vocab"], context).tolist()
        rec = {"context": context}
        for name, side in sides.items():
            pool = {"page_size": cfg["page"]} if name == "paged" else None
            side("engine", key=f"{name}/d", max_batch=1, max_model_len=context + new, steps_per_call=cfg["decode_burst"],
                 pool=pool)
            first = side("decode", key=f"{name}/d", prompt=prompt, new=new)
            rec[name] = {"first_ttft_s": first["ttft_s"], "runs": [], "tokens": [first["tokens"]]}
        for i in range(rounds):
            for name in ("row", "paged") if i % 2 == 0 else ("paged", "row"):
                r = sides[name]("decode", key=f"{name}/d", prompt=prompt, new=new)
                rec[name]["runs"].append({k: r[k] for k in ("decode_tokens_per_s", "ttft_s", "cached", "bursts")})
                rec[name]["tokens"].append(r["tokens"])
        for name, side in sides.items():
            side("drop", prefix=f"{name}/d")
            rec[name]["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in rec[name]["runs"])
        rec["paged_vs_row"] = rec["paged"]["decode_tokens_per_s"] / rec["row"]["decode_tokens_per_s"]
        rec["greedy_identical"] = all(t == rec["row"]["tokens"][0] for s in sides for t in rec[s]["tokens"])
        out.append(rec)
        print(f"  decode {context}: paged {rec['paged']['decode_tokens_per_s']:.1f}, row "
              f"{rec['row']['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return {"new_tokens": new, "contexts": out}


def part_page_size(paged, row, cfg: dict, rounds: int) -> dict:
    vocab, new, context = cfg["model"]["vocab"], cfg["decode_new"], cfg["page_context"]
    prompt = np.random.default_rng(context).integers(0, vocab, context).tolist()
    rng = np.random.default_rng(2)
    res = {}
    for ps in cfg["page_sizes"]:                       # room for the long prompt and a fresh one beside it
        pool = {"page_size": ps, "kv_cache_tokens": context + new + cfg["prefill"] + 4 * ps}
        paged("engine", key=f"paged/s{ps}", max_batch=1, max_model_len=context + new,
              steps_per_call=cfg["decode_burst"], pool=pool)
        first = paged("decode", key=f"paged/s{ps}", prompt=prompt, new=new)
        res[ps] = {"first_ttft_s": first["ttft_s"], "decode": [], "prefill_ttft_s": [], "tokens": first["tokens"]}
    for i in range(rounds):
        fresh = rng.integers(0, vocab, cfg["prefill"]).tolist()
        for ps in cfg["page_sizes"][::1 if i % 2 == 0 else -1]:
            res[ps]["decode"].append(paged("decode", key=f"paged/s{ps}", prompt=prompt, new=new)["decode_tokens_per_s"])
            res[ps]["prefill_ttft_s"].append(paged("decode", key=f"paged/s{ps}", prompt=fresh, new=1)["ttft_s"])
    paged("drop", prefix="paged/s")
    for r in res.values():
        r["decode_tokens_per_s"], r["prefill_s"] = statistics.median(r["decode"]), statistics.median(r["prefill_ttft_s"])
    return {"context": context, "prefill_prompt": cfg["prefill"],
            "greedy_identical": len({tuple(r["tokens"]) for r in res.values()}) == 1, "sizes": res}


# -- the run ------------------------------------------------------------------------------------------

def make_model(tmp: pathlib.Path, cfg: dict) -> pathlib.Path:
    from glm_jax.convert.checkpoint import convert
    from glm_jax.testing import write_random_checkpoint

    longest = max(cfg["long"], *cfg["contexts"], cfg["page_context"]) + 128
    config = long_model_config(longest, **cfg["model"])
    write_random_checkpoint(tmp / "hf", config, layout="glm", seed=0)
    convert(tmp / "hf", tmp / "model", progress=False)
    return tmp / "model"


def baseline_side(ref: str, tmp: pathlib.Path):
    """(the row engine's side, its root or None)."""
    if ref == "self":
        return Local(OPS), None
    root = pathlib.Path(ref)
    if not root.is_dir():
        root = tmp / "baseline"
        root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return Worker(pathlib.Path(__file__).resolve(), ["--worker"], root.resolve()), root.resolve()


def table(results: dict) -> list[str]:
    lines = [results["command"], f"{results['date']}, {results['cpu_count']} CPUs; baseline {results['baseline']}"]
    if c := results.get("concurrency"):
        m, r, b = c["mean"], c["ratios"], c["bound"]
        lines.append(f"concurrency ({c['workload']['requests']} requests, all at t=0; KV bytes row "
                     f"{c['engines']['row']['kv_bytes']:,} / paged {c['engines']['paged']['kv_bytes']:,}):")
        lines.append(f"  {'side':<6}{'running mean':>13}{'max':>5}{'tok/s':>9}{'ttft p50':>10}{'p99':>8}"
                     f"{'preempt':>9}{'hit pages':>10}")
        for name in ("row", "paged"):
            x = m[name]
            lines.append(f"  {name:<6}{x['running_mean']:>13.2f}{x['running_max']:>5}{x['output_tokens_per_s']:>9.1f}"
                         f"{x['ttft_p50_s']:>10.2f}{x['ttft_p99_s']:>8.2f}{x['preemptions']:>9.1f}"
                         f"{x['prefix_hit_pages']:>10.1f}")
        lines.append(f"  paged/row: running {r['running_mean']:.2f}x (>= 6), ttft p50 {r['ttft_p50']:.2f}x (<= 0.3), "
                     f"tok/s {r['output_tokens_per_s']:.2f}x (>= 1.5); greedy identical {c['greedy_identical_requests']}"
                     f" of {c['workload']['requests']}")
        step_b = b[f"step_{b['rows']}"]["step_s"]
        lines.append(f"  bound at {b['rows']} rows: step {step_b * 1e3:.1f} ms vs "
                     f"{b['step_1']['step_s'] * 1e3:.1f} ms at one row (decode gain {b['decode_only_gain']:.1f}x), "
                     f"prefill alone {b['prefill_alone_s']:.1f} s: {b['bound_output_tokens_per_s']:.1f} tok/s; paged "
                     f"reaches {100 * b['paged_fraction_of_bound']:.0f}% (>= 80%)")
        lines.append(f"  FCFS floor of TTFT p50: {b['fcfs_ttft_p50_floor_s']:.1f} s "
                     f"= {b['fcfs_floor_over_row_ttft_p50']:.2f}x the row engine's p50")
    if p := results.get("prefix"):
        lines.append(f"prefix: {len(p['ttft_s'])} users, first TTFT {p['ttft_s'][0]:.3f} s, others median "
                     f"{p['ttft_ratio_median']:.3f}x, max {p['ttft_ratio_max']:.3f}x (<= 0.2); cached tokens "
                     f"{p['cached'][1:3]}...; peak pages used {p['peak']['pages_used']} with {p['peak']['running']} "
                     f"running (unshared: {p['peak']['pages_unshared']}; system prompt {p['system_pages']} pages)")
    if d := results.get("decode"):
        for x in d["contexts"]:
            lines.append(f"decode at {x['context']}: paged {x['paged']['decode_tokens_per_s']:.1f} tok/s, row "
                         f"{x['row']['decode_tokens_per_s']:.1f}: {x['paged_vs_row']:.2f}x (>= 0.9); first TTFT paged "
                         f"{x['paged']['first_ttft_s']:.1f} s, row {x['row']['first_ttft_s']:.1f} s; greedy identical "
                         f"{x['greedy_identical']}")
    if s := results.get("page_size"):
        lines.append(f"page size: decode tok/s at {s['context']} / TTFT of a {s['prefill_prompt']}-token prompt")
        for ps, x in s["sizes"].items():
            lines.append(f"  {ps:>4}: {x['decode_tokens_per_s']:8.1f} tok/s  {x['prefill_s']:7.3f} s")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--baseline", default="272279a", help="the row engine: a commit, a tree's folder, or 'self'")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per part (default 3)")
    parser.add_argument("--contexts", default=None, help="decode part's context lengths (default 16384,61440)")
    parser.add_argument("--small", action="store_true", help="a tiny model and workload (the tests)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="the JSON's file (default benchmarks/results/DATE-paged.json; none with --small)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_ops(OPS)
        return 0
    parts = [p for p in args.parts.split(",") if p]
    cfg = dict(SMALL if args.small else FULL)
    if args.contexts:
        cfg["contexts"] = tuple(int(c) for c in args.contexts.split(","))
    if set(parts) - set(PARTS) or args.rounds < 1:
        print(f"bench_paged.py: error: parts must be of {PARTS} and --rounds >= 1", file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    out = args.out or (None if args.small else ROOT / "benchmarks" / "results" / f"{date}-paged.json")
    results = {"command": shlex.join(["python", "scripts/bench_paged.py", *(sys.argv[1:] if argv is None else argv)]),
               "date": date, "cpu_count": os.cpu_count(), "baseline": args.baseline, "config": cfg}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        folder = str(make_model(tmp, cfg))
        paged = Local(OPS)
        row, root = baseline_side(args.baseline, tmp)
        try:
            results["imports"] = {"paged": paged("load", folder=folder, prefill_chunk=cfg["prefill_chunk"]),
                                  "row": row("load", folder=folder, prefill_chunk=cfg["prefill_chunk"])}
            if root is not None and not results["imports"]["row"]["scheduler"].startswith(str(root)):
                raise RuntimeError(f"the baseline worker imported {results['imports']['row']}, not {root}'s")
            for part in parts:
                start = time.perf_counter()
                results[part] = globals()[f"part_{part}"](paged, row, cfg, args.rounds)
                results[part]["seconds"] = time.perf_counter() - start
        finally:
            row.close()
    text = json.dumps(results, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text if args.json else "\n".join(table(results) + ([f"JSON written to {out}"] if out else [])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
