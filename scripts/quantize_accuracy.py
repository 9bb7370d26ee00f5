#!/usr/bin/env python3
"""Quantized weights against float32: teacher-forced logits, next to bf16's own error.

  python scripts/quantize_accuracy.py [--json] [--needle-model DIR]

Rows, for each model: the relative error of the logits (||x - f32|| / ||f32||) and the top-1
agreement with the float32 logits of
  bf16          the same weights in bfloat16 (glm-jax, float32 accumulation): bf16's own error;
  int8 / int4   glm-jax with the projections quantized (float32 compute; "bf16 compute" rows: the
                quantized model run in bfloat16, as it is deployed; "+ output layer" rows: the output
                layer quantized to int8 per vocabulary row as well, which glm-jax does not do);
  ... f64 sim   the same absmax rounding of the same weights simulated in float64 (transformers'
                GlmForCausalLM in float64 with rounded projections, glm_jax.testing.rounded_float64):
                what the rounding itself costs, with no float32 noise.
Models: the float32 fixture (its reference.npz logits from the original PyTorch code), the bf16
fixture (the original's float32 run on its bf16 weights), random transformers configurations.

--needle-model DIR (a model trained by scripts/bench_finetune.py): its needle grid score (as in
docs/benchmarks.md) and the perplexity of the answers of held-out needle prompts (teacher-forced;
the loss it trained on), with float, int8 and int4 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "fixtures"


def compare(x: np.ndarray, ref: np.ndarray) -> dict:
    ref = ref.astype(np.float64)
    return {"rel_err": float(np.linalg.norm(x - ref) / np.linalg.norm(ref)),
            "top1": float((x.argmax(-1) == ref.argmax(-1)).mean())}


def quantized_head(model, q: str):
    """The model with its output layer quantized too (glm-jax keeps it in float; this row measures why)."""
    from glm_jax.options import Quantization
    from glm_jax.quantize import quantize

    head = model.state["lm_head"]
    head.set_value(quantize(head.get_value(), Quantization.parse(q), 1, "lm_head"))
    return model


def rows_for(folder: pathlib.Path, hf_folder: pathlib.Path, ids: np.ndarray, ref: np.ndarray, int4: str) -> dict:
    """Every row of the table for one model: glm-jax `folder`, transformers `hf_folder` (glm layout)."""
    import torch
    import transformers

    import glm_jax
    from glm_jax.options import Quantization
    from glm_jax.testing import rounded_float64

    hf = transformers.GlmForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    out = {"bf16": compare(glm_jax.load(folder, dtype="bfloat16").logits(ids), ref)}
    for q in ("int8", int4):
        spec = Quantization.parse(q)
        out[q] = compare(glm_jax.load(folder, dtype="float32", quantize=q).logits(ids), ref)
        out[f"{q} bf16 compute"] = compare(glm_jax.load(folder, dtype="bfloat16", quantize=q).logits(ids), ref)
        out[f"{q} + output layer"] = compare(quantized_head(glm_jax.load(folder, dtype="float32", quantize=q),
                                                            "int8").logits(ids), ref)
        with torch.no_grad():
            sim = rounded_float64(hf, spec.kind, spec.group)(torch.from_numpy(np.asarray(ids))).logits.numpy()
        out[f"{q} f64 sim"] = compare(sim, ref)
    return out


def fixtures(tmp: pathlib.Path) -> dict:
    from glm_jax.convert.checkpoint import convert, export

    tables = {}
    f32 = np.load(FIXTURES / "glm-hf-f32" / "reference.npz")
    tables["fixture glm-hf-f32 (float32)"] = rows_for(FIXTURES / "glm-hf-f32", FIXTURES / "glm-hf-f32",
                                                      f32["input_ids"], f32["logits"], "int4:32")
    # the bf16 fixture in the glm layout, for transformers
    convert(FIXTURES / "chatglm-bf16", tmp / "bf16", progress=False)
    export(tmp / "bf16", tmp / "bf16-glm", layout="glm", progress=False)
    bf16 = np.load(FIXTURES / "chatglm-bf16" / "reference.npz")
    tables["fixture chatglm-bf16 (vs the original's float32 run)"] = rows_for(
        FIXTURES / "chatglm-bf16", tmp / "bf16-glm", bf16["input_ids"], bf16["logits_fp32"], "int4:32")
    return tables


RANDOM = [dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=32),
          dict(hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64)]


def random_configs(tmp: pathlib.Path) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from _bench import hf_random_model

    from glm_jax.testing import random_config

    tables = {}
    for i, shape in enumerate(RANDOM):
        config = random_config(vocab_size=2048, rope_theta=1e4, max_seq_len=4096, pad_token_id=0, eos_token_ids=(1,),
                               **shape)
        hf = hf_random_model(tmp / f"random{i}", config, seed=i)
        ids = np.random.default_rng(i).integers(0, config.vocab_size, (2, 64))
        with torch.no_grad():
            ref = hf(torch.from_numpy(ids)).logits.numpy()
        name = f"random {shape['num_layers']} layers, hidden {shape['hidden_size']}, vocab 2048"
        tables[name] = rows_for(tmp / f"random{i}", tmp / f"random{i}", ids, ref, "int4")
    return tables


def needle_model(folder: pathlib.Path, tmp: pathlib.Path, int4: list[str], cases: int = 40) -> dict:
    """The needle grid score and the held-out answers' perplexity, float / int8 / int4."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_finetune as bf

    import glm_jax
    from glm_jax.evals import needle as N
    from glm_jax.tokenizer import Tokenizer

    from glm_jax.train.data import IGNORE, read_examples

    tokenizer = Tokenizer.from_file(folder)
    haystack = N.load_haystack(None, tokenizer)
    rng = np.random.default_rng(12345)                   # not the training draw (bench_finetune's seed 0)
    bf.write_data(tmp / "held-out.jsonl", tokenizer, haystack, bf.draw_needles(rng, cases, N.CITIES, 64, 192, set()))
    examples = read_examples(tmp / "held-out.jsonl", tokenizer, seq_len=512)   # the answers counted, as in training
    out = {}
    for q in (None, "int8", *int4):
        model = glm_jax.load(folder, quantize=q)
        nll, count = 0.0, 0
        for ex in examples:
            logits = model.logits(ex.input_ids[None].astype(np.int64))[0].astype(np.float64)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            t = np.flatnonzero(ex.labels != IGNORE)                    # position t is predicted at t - 1
            nll -= logp[t - 1, ex.labels[t]].sum()
            count += len(t)
        grid = N.run(N.NeedleConfig(model=folder, out=tmp / f"needle-{q}", lengths=[64, 96, 128, 160, 192],
                                    depths=[0, 25, 50, 75, 100], samples=4, instruction="Answer with the number only.",
                                    max_new_tokens=8, quantize=q, force=True, progress=False))
        out[q or "float"] = {"answer_perplexity": float(np.exp(nll / count)), "answer_tokens": count,
                             "needle_accuracy": grid["accuracy"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--needle-model", type=pathlib.Path, default=None,
                        help="a model folder trained by scripts/bench_finetune.py")
    parser.add_argument("--needle-int4", default="int4:64,int4:32",
                        help="int4 forms for the needle model, comma-separated (its hidden size is 64)")
    parser.add_argument("--skip-logits", action="store_true", help="only the needle model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        results = {} if args.skip_logits else {**fixtures(tmp), **random_configs(tmp)}
        if args.needle_model:
            results["needle model"] = needle_model(args.needle_model, tmp, args.needle_int4.split(","))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for table, rows in results.items():
        print(f"\n{table}")
        for name, r in rows.items():
            print("  " + f"{name:22s} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
