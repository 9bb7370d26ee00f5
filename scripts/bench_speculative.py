#!/usr/bin/env python3
"""Speculative decoding (n-gram drafts) against plain decoding at a long context, same run, on the
162M long-context model of bench_long.py (random GLM-4, 2 layers, hidden 512, 8/2 heads of 128, ffn
1408, vocab 151,552, float32; batch 1, greedy).

  python scripts/bench_speculative.py [--prompt 16384 --new 64 --repeats 3 --k 4,8] [--wrong] [--json]

Decode tokens/s from per-token timestamps, first to last token of a call, medians of --repeats
interleaved rounds; the prompt's K/V are reused from the first call, so calls time decode. Speedups:
the ratio of medians, and `paired_speedup` the median of each round's ratio (the sides of a round run
back to back: a load that changes during the run falls on both). Workloads:
- copy: a model that quotes its prompt by construction: the random model with every block's output
  projections (o_proj, down_proj) zeroed (`glm_jax.testing.damp_blocks`), so the next token is a
  function of the current one and greedy decoding walks a fixed chain of tokens, at the full model's
  cost per step (the zeroed weights are still read and multiplied). Prompt: random tokens, then a
  stretch of the chain (the passage), a few random tokens, and the passage's first token: the
  continuation is the passage, which the n-gram lookup finds in the prompt.
- no match: the same model and random prompt without the passage: no n-gram of the output occurs
  earlier, no drafts, plain bursts.
- wrong drafts (--wrong): the copy prompt with every third token of the passage replaced by a random
  one: the n-grams the model's output ends with are found and followed by the wrong token, so drafts
  are proposed and rejected (a row whose drafts keep missing drafts less and less often).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # libtpu is installed; keep JAX on the CPU cores

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _bench import rounds  # noqa: E402

VOCAB = 151552
PASSAGE = 256        # chain tokens the copy prompt quotes (more than --new)


def decode_rate(model, prompt: list[int], new: int, k: int) -> tuple[float, list[int], dict]:
    """(decode tokens/s from the first to the last token, tokens, speculative counts) of one greedy call."""
    stamps = []
    spec = {"speculative": "ngram", "num_speculative_tokens": k} if k else {}
    tokens = model.generate([prompt], max_new_tokens=new, temperature=0, stop_ids=(),
                            on_token=lambda row, token: stamps.append(time.perf_counter()), **spec)[0]
    return (new - 1) / (stamps[-1] - stamps[0]), tokens, model.speculative_stats()


def workload(model, prompt: list[int], new: int, ks: list[int], repeats: int) -> dict:
    out = {}
    sides = {k: (lambda k=k: out.setdefault(k, []).append(decode_rate(model, prompt, new, k))) for k in [0, *ks]}
    rounds(sides, repeats, warmup=1)
    base = out[0][-repeats:]
    row = {"none": {"tokens_per_s": statistics.median(r[0] for r in base), "runs": [r[0] for r in base]}}
    for k in ks:
        runs = out[k][-repeats:]
        stats = runs[-1][2]
        row[f"ngram_k{k}"] = {"tokens_per_s": statistics.median(r[0] for r in runs), "runs": [r[0] for r in runs],
                              **stats, "acceptance_rate": stats["accepted"] / stats["proposed"] if stats["proposed"]
                              else None, "same_tokens": all(r[1] == base[0][1] for r in runs)}
        row[f"ngram_k{k}"]["speedup"] = row[f"ngram_k{k}"]["tokens_per_s"] / row["none"]["tokens_per_s"]
        row[f"ngram_k{k}"]["paired_speedup"] = statistics.median(r[0] / b[0] for r, b in zip(runs, base))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=16384, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", default="4,8", help="drafts per verification step, comma-separated")
    parser.add_argument("--wrong", action="store_true", help="also the workload whose drafts are all wrong")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    if args.new >= PASSAGE or args.prompt < 2 * PASSAGE or min(ks) < 1:
        print(f"bench_speculative.py: error: needs --new < {PASSAGE}, --prompt >= {2 * PASSAGE}, k >= 1",
              file=sys.stderr)
        return 2

    import jax

    from glm_jax.api import Model
    from glm_jax.testing import damp_blocks, random_model

    config, graphdef, state = random_model(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_layers=2,
                                           num_heads=8, num_kv_heads=2, head_dim=128, rope_theta=1e8,
                                           max_seq_len=args.prompt + PASSAGE + args.new)
    copier = Model(config, graphdef, state)
    damp_blocks(copier, 0.0)
    rng = np.random.default_rng(0)
    chain = [int(rng.integers(0, VOCAB))]
    chain += copier.generate([chain], max_new_tokens=PASSAGE - 1, temperature=0, stop_ids=())[0]
    filler = rng.integers(0, VOCAB, args.prompt - PASSAGE - 9).tolist()
    tail = rng.integers(0, VOCAB, 8).tolist()
    results = {"command": shlex.join(["python", "scripts/bench_speculative.py", *sys.argv[1:]]),
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
               "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg(),
               "model": {"parameters": config.num_params, "layers": 2, "hidden": 512, "vocab": VOCAB},
               "prompt": args.prompt, "new": args.new, "repeats": args.repeats}
    results["copy"] = workload(copier, filler + chain + tail + chain[:1], args.new, ks, args.repeats)
    results["no_match"] = workload(copier, filler + rng.integers(0, VOCAB, PASSAGE + 9).tolist(), args.new, ks,
                                   args.repeats)
    if args.wrong:
        spoiled = [int(rng.integers(0, VOCAB)) if i % 3 == 2 else t for i, t in enumerate(chain)]
        results["wrong_drafts"] = workload(copier, filler + spoiled + tail + chain[:1], args.new, ks, args.repeats)
    results["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(results["command"])
    print(f"{config.num_params / 1e6:.0f}M parameters, prompt {args.prompt}, {args.new} new tokens, greedy, median of "
          f"{args.repeats}; load average before {results['load_average_before'][0]:.1f}, after "
          f"{results['load_average_after'][0]:.1f} ({results['cpu_count']} CPUs)")
    for name in ("copy", "no_match", "wrong_drafts"):
        for side, r in results.get(name, {}).items():
            extra = "" if side == "none" else (f"  {r['speedup']:.2f}x (paired {r['paired_speedup']:.2f}x), "
                                               f"accepted {r['accepted']}/{r['proposed']}, "
                                               f"same tokens: {r['same_tokens']}")
            print(f"{name:<12} {side:<10} {r['tokens_per_s']:8.1f} tok/s{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
