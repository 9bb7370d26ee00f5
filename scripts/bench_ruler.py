#!/usr/bin/env python3
"""`glm-jax ruler` on this machine: samples batched through the engine against one at a time, and the
cost of a long cell, on a random GLM-4 (default: the 162M model of bench_long.py: 2 layers, hidden 512,
8/2 heads of 128, the full vocabulary, float32, the real tokenizer).

  python scripts/bench_ruler.py --out benchmarks/results/2026-12-07-cpu-bench-ruler.json

1. Throughput: `--tasks niah_single_1 --lengths L --samples N` (RULER's 128-token budget: a random
   model never stops early) with `--batch-size N` and with `--batch-size 1`, in that order and then
   again (the first pair compiles); samples per second from the second pair's batch seconds.
2. A long cell: `--lengths LONG --samples 2 --batch-size 1` (the first sample compiles, the second
   does not).

Each run is the `glm-jax ruler` command itself (glm_jax.cli.main) into a fresh OUT; the figures come
from its results.jsonl (`batch_seconds`: the engine's time, model loading and prompt building
excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_ruler(model: pathlib.Path, out: pathlib.Path, *args: str) -> dict:
    from glm_jax.cli import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):      # the command's summary (this script prints its own)
        status = main(["ruler", "--model", str(model), "--out", str(out), "--quiet", "--json", *args])
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"glm-jax ruler {' '.join(args)} exited {status}")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    engine = sum(r["seconds"] for r in rows)          # each row holds its share of its batch's seconds
    return {"args": list(args), "samples": len(rows), "wall_s": round(wall, 2), "engine_s": round(engine, 2),
            "samples_per_s": round(len(rows) / engine, 3), "batch_seconds": [r["batch_seconds"] for r in rows],
            "prompt_tokens": [r["prompt_tokens"] for r in rows], "new_tokens": [r["new_tokens"] for r in rows]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096, help="throughput runs' length (default 4096)")
    p.add_argument("--samples", type=int, default=8, help="throughput runs' samples = the batch (default 8)")
    p.add_argument("--long", type=int, default=16384, help="the long cell's length (default 16384; 0 skips it)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--out", type=pathlib.Path, help="also write the JSON here")
    args = p.parse_args()

    import jax

    from glm_jax.testing import random_config, write_random_model

    config = random_config(hidden_size=args.hidden, intermediate_size=1408, num_layers=args.layers, num_heads=8,
                           num_kv_heads=2, head_dim=128, rope_theta=1e8,
                           max_seq_len=max(args.length, args.long) + 256)
    result = {"command": shlex.join(["python", "scripts/bench_ruler.py", *sys.argv[1:]]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
              "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
              "model": {"parameters": config.num_params, "layers": args.layers, "hidden": args.hidden,
                        "heads": "8/2 of 128", "dtype": "float32"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model = write_random_model(tmp / "model", config, reference=ROOT / "tests" / "data")
        common = ["--tasks", "niah_single_1", "--lengths", str(args.length), "--samples", str(args.samples)]
        runs = []
        for i in range(2):
            for batch in (args.samples, 1):
                runs.append(run_ruler(model, tmp / f"t{i}-{batch}", *common, "--batch-size", str(batch)))
                print(f"round {i + 1}, batch {batch}: {runs[-1]['engine_s']} s, {runs[-1]['samples_per_s']} samples/s",
                      file=sys.stderr)
        batched, single = runs[2], runs[3]
        result["throughput"] = {"length": args.length, "samples": args.samples, "runs": runs,
                                "batched_samples_per_s": batched["samples_per_s"],
                                "single_samples_per_s": single["samples_per_s"],
                                "speedup": round(batched["samples_per_s"] / single["samples_per_s"], 2)}
        if args.long:
            cell = run_ruler(model, tmp / "long", "--tasks", "niah_single_1", "--lengths", str(args.long),
                             "--samples", "2", "--batch-size", "1")
            result["long_cell"] = {"length": args.long, **cell, "first_sample_s": cell["batch_seconds"][0],
                                   "second_sample_s": cell["batch_seconds"][1]}
            print(f"{args.long:,}-token sample: {cell['batch_seconds'][0]} s (compiling), "
                  f"{cell['batch_seconds'][1]} s", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
