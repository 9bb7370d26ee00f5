#!/usr/bin/env python3
"""A tiny GLM-4 learns needle retrieval on this CPU: the fine-tuning path end to end.

  python scripts/bench_finetune.py                      # the benchmark (about 15 minutes here)
  python scripts/bench_finetune.py --quick --out /tmp/needle-quick --results /tmp/quick.json

1. A random GLM-4 model folder (glm-jax format: config.json, params/, the real GLM-4 tokenizer and
   generation files from tests/data), seeded: `--layers` layers, hidden `--hidden`, the full
   151,552-token vocabulary (the tokenizer's special tokens sit at the top of it).
2. Training data, JSONL in `glm-jax finetune`'s chat form: one user turn built by the needle
   evaluation's own code (glm_jax/evals/needle/: the built-in filler haystack, the needle
   `The special magic {city} number is: {7-digit number}.` at a random depth, the question and
   INSTRUCTION below), prompts of `--min-len`..`--max-len` tokens, and an assistant turn holding the
   number. The loss counts only the assistant turn (its "\\n", the digits and `<|endoftext|>`).
   With `--ruler-share F`, that share of the examples are RULER's needle tasks as `glm-jax ruler`
   builds them (another seed than its default), answered after the task's answer prefix.
3. `glm_jax.train.run.finetune` (what `glm-jax finetune` runs) trains every weight into `--out`.
4. Held-out cases (numbers never trained on, cities from all 50 of needle.CITIES, ten of which never
   appear in training), answered greedily through `glm_jax.load(...).generate`, scored as the needle
   evaluation scores (the number appears in the response).

Prints the loss curve and the held-out accuracy; writes a JSON summary (arguments, loss curve,
accuracy, each case, seconds, the command) to `--results`. `--out` is reproducible: the same
arguments and `--seed` give the same folder (on the same machine and library versions). Then:

  glm-jax needle --model benchmarks/models/needle-tiny --out runs/needle-tiny \\
      --lengths 64,128,192 --instruction "Answer with the number only." --samples 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The instruction after the question: short and fixed, so that the tiny model spends its capacity on
# the retrieval (`glm-jax needle --instruction` must repeat it; the CLI's help names it).
INSTRUCTION = "Answer with the number only."
# Cities held out of training: the held-out cases draw from all of needle.CITIES, these included.
HELD_OUT_CITIES = 10
EVAL_BATCH = 8     # held-out prompts per generate call


def reference_dir() -> pathlib.Path:
    """The GLM-4 reference data (tokenizer, published configs), as the tests find it."""
    env = os.environ.get("GLM_JAX_REFERENCE")
    return pathlib.Path(env) if env else ROOT / "tests" / "data"


def default_results(quick: bool) -> pathlib.Path:
    day = datetime.date.today().isoformat()
    return ROOT / "benchmarks" / "results" / f"{day}-cpu-bench-finetune{'-quick' if quick else ''}.json"


# Defaults of the full run, and of --quick (each flag given explicitly wins over both).
#
# Why these numbers:
# - 2 layers: copying a number out of the context is an induction-style task (a previous-token head,
#   then a head attending from the answer to the token after the matching one); one layer cannot.
# - hidden 64, 4 heads of 16, 4 KV heads (no GQA: the copied token's identity travels through the
#   values). The loss counts only the answer: the output layer runs on the answer positions alone.
# - prompts of 64-192 tokens packed into 512-token rows (examples attend only to themselves), 8 rows a
#   step (~30 answers); rope_theta 10,000: a sharper positional signal for the previous-token head.
# - AdamW, lr 3e-3, warmup 5%, cosine to 10%, clipping at 1 (a small model, a budget of minutes);
#   remat none (2 small layers' activations fit).
# Loss curves and held-out scores of earlier runs: docs/benchmarks.md. `--init` continues a run.
FULL = dict(steps=2000, batch_size=8, seq_len=512, min_len=64, max_len=192, train_examples=32000, lr=3e-3,
            layers=2, hidden=64, eval_cases=40, ruler_share=0.0, ruler_min_len=224, ruler_max_len=384)
QUICK = dict(steps=3, batch_size=1, seq_len=256, min_len=64, max_len=96, train_examples=12, lr=3e-3,
             layers=2, hidden=32, eval_cases=2, ruler_share=0.0, ruler_min_len=224, ruler_max_len=384)


def model_config(layers: int, hidden: int, max_seq_len: int):
    from glm_jax.testing import random_config

    return random_config(hidden_size=hidden, intermediate_size=2 * hidden if hidden >= 64 else 64, num_layers=layers,
                         num_heads=4, num_kv_heads=4, rope_theta=10000.0, max_seq_len=max_seq_len)


def make_model(folder: pathlib.Path, config, seed: int) -> None:
    """A random glm-jax model folder (seeded) with the real tokenizer."""
    from glm_jax.testing import write_random_model

    write_random_model(folder, config, seed=seed, reference=reference_dir())


# -- the task --------------------------------------------------------------------------------------

def draw_needles(rng, n: int, cities, min_len: int, max_len: int, exclude: set[int]):
    """n (Needle, prompt length, haystack offset) triples: random city, a 7-digit number not in
    `exclude`, a uniform depth in 0..100 and a uniform length in min_len..max_len."""
    from glm_jax.evals import needle as N

    out = []
    while len(out) < n:
        number = int(rng.integers(1_000_000, 10_000_000))
        if number in exclude:
            continue
        exclude.add(number)
        city = cities[int(rng.integers(len(cities)))]
        depth = round(float(rng.uniform(0, 100)), 1)
        out.append((N.Needle(city, number, depth), int(rng.integers(min_len, max_len + 1)),
                    int(rng.integers(len(N.FILLER)))))
    return out


def build(tokenizer, haystack, needle, length: int, offset: int):
    """(the needle evaluation's prompt, its user-turn content), with the round trip checked."""
    from glm_jax.evals import needle as N

    prompt = N.build_prompt(tokenizer, haystack, length, [needle], needle.question(INSTRUCTION), offset)
    # The prompt is one user turn (generation prompt included): its content is what lies between
    # the template's head and the closing `<|assistant|>`.
    head = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    head = head[:head.index("\x00")]
    text = prompt.text if prompt.text.endswith("<|assistant|>") else prompt.text + "<|assistant|>"
    content = text[len(head):len(text) - len("<|assistant|>")]
    if N.prompt_ids(tokenizer, content) != prompt.ids:
        raise AssertionError("the needle prompt's content does not re-encode to its ids")
    return prompt, content


def write_data(path: pathlib.Path, tokenizer, haystack, needles, ruler=()) -> list[int]:
    """The JSONL training file (chat form): the needles, then `ruler_examples`; returns each
    example's prompt length in tokens."""
    lengths = []
    with path.open("w", encoding="utf-8") as f:
        def write(content: str, answer: str, prompt_tokens: int) -> None:
            lengths.append(prompt_tokens)
            f.write(json.dumps({"messages": [{"role": "user", "content": content},
                                             {"role": "assistant", "content": answer}]}) + "\n")

        for needle, length, offset in needles:
            prompt, content = build(tokenizer, haystack, needle, length, offset)
            write(content, needle.answer, len(prompt.ids))
        for content, answer, ids in ruler:
            write(content, answer, len(ids))
    return lengths


RULER_SEED = 1000   # + --seed: the RULER draws trained on; `glm-jax ruler` evaluates seed 0 (held out)
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery")


def ruler_examples(tokenizer, n: int, lo: int, hi: int, seed: int,
                   tasks=RULER_TASKS) -> list[tuple[str, str, list[int]]]:
    """n (user turn, assistant turn, the prompt `glm-jax ruler` gives) of RULER's needle `tasks` in turn
    (the essay ones on the noise lines, as `glm-jax ruler` without --haystack), of lo..hi tokens: the
    assistant turn is the task's answer prefix, then the values."""
    import numpy as np

    from glm_jax.evals.ruler import Inputs, make_sample
    from glm_jax.evals.ruler.niah import NOISE, essay_words

    inputs, rng, out = Inputs(essay_words(NOISE)), np.random.default_rng([seed, 3]), []
    for i in range(n):
        s = make_sample(tokenizer, tasks[i % len(tasks)], int(rng.integers(lo, hi + 1)), i, inputs,
                        RULER_SEED + seed, 0)
        answer = s.rendered.prefix.lstrip(" ") + " " + ", ".join(s.rendered.answers) + "."
        out.append((s.rendered.content, answer, s.ids))
    return out


def check_data(path: pathlib.Path, tokenizer, prompt_ids: list[int], seq_len: int, index: int = 0,
               counted_from: int | None = None) -> None:
    """Example `index` as `glm-jax finetune` reads it: the evaluation's prompt ids, then counted
    answer tokens only (from `counted_from`: a RULER prompt ends inside the answer's turn)."""
    from glm_jax.train.data import IGNORE, read_examples

    ex = read_examples(path, tokenizer, seq_len=seq_len)[index]
    n = len(prompt_ids) if counted_from is None else counted_from
    if list(ex.input_ids[:len(prompt_ids)]) != prompt_ids or (ex.labels[:n] != IGNORE).any() or \
            (ex.labels[n:] == IGNORE).any():
        raise AssertionError("finetune's reading of the data does not count exactly the answer")


# -- the loss curve, live --------------------------------------------------------------------------

class LossPrinter(threading.Thread):
    """Prints `step N loss X` from finetune's metrics.jsonl as lines arrive (every `every` steps)."""

    def __init__(self, path: pathlib.Path, every: int, total: int):
        super().__init__(daemon=True)
        self.path, self.every, self.total = path, every, total
        self.stop, self.seen, self.began = threading.Event(), 0, time.perf_counter()

    def poll(self) -> None:
        for line in (self.path.read_text().splitlines() if self.path.is_file() else [])[self.seen:]:
            try:
                row = json.loads(line)
            except ValueError:       # a line being written
                break
            self.seen += 1
            if row["step"] == 1 or row["step"] % self.every == 0 or row["step"] == self.total:
                print(f"step {row['step']:5d}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  grad norm "
                      f"{row['grad_norm']:.3f}  {row['tokens_per_s']:,.0f} tok/s  "
                      f"({time.perf_counter() - self.began:.0f} s)", flush=True)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()
        self.poll()


# -- evaluation ------------------------------------------------------------------------------------

def evaluate(folder: pathlib.Path, tokenizer, haystack, cases, max_new_tokens: int = 16) -> list[dict]:
    """Greedy answers of the model folder to each held-out case, scored as the needle evaluation does."""
    import glm_jax
    from glm_jax.evals import needle as N

    model = glm_jax.load(folder)
    prompts = [build(tokenizer, haystack, needle, length, offset)[0] for needle, length, offset in cases]
    rows = []
    for i in range(0, len(cases), EVAL_BATCH):
        group = list(range(i, min(i + EVAL_BATCH, len(cases))))
        outs = model.generate([prompts[j].ids for j in group], max_new_tokens=max_new_tokens, temperature=0)
        for j, ids in zip(group, outs):
            needle, _, offset = cases[j]
            response = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append({"city": needle.city, "number": needle.number, "depth_percent": needle.depth,
                         "prompt_tokens": len(prompts[j].ids), "haystack_offset": offset,
                         "needle_token_index": prompts[j].needle_token_indices[0], "response": response,
                         "correct": N.is_correct(needle.answer, response)})
    return rows


def accuracy(rows) -> float | None:
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


# -- the run ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "models" / "needle-tiny",
                   help="the trained model folder (default benchmarks/models/needle-tiny; weights are not committed: "
                        "rerun the script to make them)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--results", type=pathlib.Path, default=None,
                   help="JSON summary (default benchmarks/results/DATE-cpu-bench-finetune.json; "
                        "with --quick ...-quick.json)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK['steps']} steps of a hidden-{QUICK['hidden']} model on "
                        f"{QUICK['train_examples']} examples of {QUICK['min_len']}-{QUICK['max_len']} tokens, "
                        f"{QUICK['eval_cases']} held-out cases (learns nothing; checks the pipeline)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"packed rows per step (default {FULL['batch_size']})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per packed training row (default {FULL['seq_len']}); at least --max-len + 16")
    p.add_argument("--min-len", type=int, default=None,
                   help=f"shortest prompt in tokens, the whole chat prompt counted (default {FULL['min_len']})")
    p.add_argument("--max-len", type=int, default=None, help=f"longest prompt in tokens (default {FULL['max_len']})")
    p.add_argument("--train-examples", type=int, default=None,
                   help=f"training examples, each a different number (default {FULL['train_examples']}; "
                        "the steps cycle through them)")
    p.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default {FULL['lr']:g})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps before the cosine decay (default 5%% of --steps)")
    p.add_argument("--layers", type=int, default=None, help=f"model layers (default {FULL['layers']})")
    p.add_argument("--hidden", type=int, default=None,
                   help=f"hidden size, a multiple of 8 (default {FULL['hidden']}; 4 query heads, 4 KV heads)")
    p.add_argument("--eval-cases", type=int, default=None,
                   help=f"held-out cases answered after training (default {FULL['eval_cases']})")
    p.add_argument("--init", type=pathlib.Path, default=None,
                   help="start from this model folder (an earlier run's --out) instead of a random model; "
                        "--layers/--hidden are then its own")
    p.add_argument("--ruler-share", type=float, default=None, help="the share of training examples that are "
                   f"`glm-jax ruler`'s prompts of --ruler-tasks (seed {RULER_SEED} + --seed), answered (default 0)")
    p.add_argument("--ruler-tasks", default=",".join(RULER_TASKS), help="RULER tasks trained on, in turn (default "
                   "all eight needle tasks)")
    p.add_argument("--ruler-min-len", type=int, default=None,
                   help=f"shortest RULER example in tokens (default {FULL['ruler_min_len']})")
    p.add_argument("--ruler-max-len", type=int, default=None,
                   help=f"longest RULER example in tokens (default {FULL['ruler_max_len']})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data, its order and the held-out cases (default 0)")
    p.add_argument("--print-every", type=int, default=None, help="print the loss every N steps (default steps/30)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.results is None:
        args.results = default_results(args.quick)
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 20
    if args.print_every is None:
        args.print_every = max(1, args.steps // 30)
    return args


def check_args(args) -> None:
    for flag in ("steps", "batch_size", "seq_len", "min_len", "train_examples", "layers", "eval_cases",
                 "print_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup_steps < 0 or args.warmup_steps > args.steps:
        raise ValueError(f"--warmup-steps must be in [0, {args.steps}], got {args.warmup_steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr:g}")
    if args.hidden < 8 or args.hidden % 8:
        raise ValueError(f"--hidden must be a positive multiple of 8, got {args.hidden}")
    if args.min_len < 48:
        raise ValueError(f"--min-len must be at least 48 (the template, needle and question take ~45 tokens), "
                         f"got {args.min_len}")
    if args.max_len < args.min_len:
        raise ValueError(f"--max-len {args.max_len} is below --min-len {args.min_len}")
    if set(args.ruler_tasks.split(",")) - set(RULER_TASKS):
        raise ValueError(f"--ruler-tasks must be of {', '.join(RULER_TASKS)}, got {args.ruler_tasks}")
    if not 0 <= args.ruler_share < 1:
        raise ValueError(f"--ruler-share must be in [0, 1), got {args.ruler_share:g}")
    if args.ruler_share and not 200 <= args.ruler_min_len <= args.ruler_max_len <= args.seq_len - 48:
        raise ValueError(f"RULER lengths {args.ruler_min_len}..{args.ruler_max_len} must lie in 200..--seq-len - 48 "
                         f"= {args.seq_len - 48} (the templates; the values after the prefix)")
    if args.seq_len < args.max_len + 16:
        raise ValueError(f"--seq-len {args.seq_len} must be at least --max-len + 16 = {args.max_len + 16} "
                         "(the prompt and its answer)")
    if args.out.exists() and not args.force and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ValueError(f"--out {args.out} exists and is not empty (--force replaces it)")
    if args.init and not (args.init / "config.json").is_file():
        raise ValueError(f"--init {args.init} is not a model folder (no config.json)")
    if args.results.exists() and args.results.is_dir():
        raise ValueError(f"--results {args.results} is a folder")
    if not (reference_dir() / "tokenizer.model").is_file():
        raise ValueError(f"no GLM-4 tokenizer at {reference_dir() / 'tokenizer.model'} (set GLM_JAX_REFERENCE)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        check_args(args)
    except ValueError as e:
        print(f"bench_finetune: error: {e}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    from glm_jax.runtime import select_platforms

    select_platforms()          # as `glm-jax` does: an installed libtpu is not started off a TPU machine

    import numpy as np

    from glm_jax.evals import needle as N
    from glm_jax.tokenizer import Tokenizer
    from glm_jax.train.run import FinetuneConfig, finetune

    rng = np.random.default_rng([args.seed, 1])
    tokenizer = Tokenizer.from_file(reference_dir() / "tokenizer.model")
    haystack = N.load_haystack(None, tokenizer)
    # Held-out cases first, so that training never uses their numbers.
    used: set[int] = set()
    held_out = draw_needles(np.random.default_rng([args.seed, 2]), args.eval_cases, N.CITIES, args.min_len,
                            args.max_len, used)
    train_cities = N.CITIES[:len(N.CITIES) - HELD_OUT_CITIES]
    n_ruler = round(args.ruler_share * args.train_examples)
    train = draw_needles(rng, args.train_examples - n_ruler, train_cities, args.min_len, args.max_len, used)
    try:
        ruler = ruler_examples(tokenizer, n_ruler, args.ruler_min_len, args.ruler_max_len, args.seed,
                               args.ruler_tasks.split(","))
    except ValueError as e:     # a RULER length too short for a task's template
        print(f"bench_finetune: error: {e}", file=sys.stderr)
        return 2

    if args.out.exists():
        shutil.rmtree(args.out) if args.out.is_dir() else args.out.unlink()
    from glm_jax.config import GLMConfig

    config = GLMConfig.load(args.init / "config.json") if args.init else \
        model_config(args.layers, args.hidden, max_seq_len=max(4096, args.seq_len))
    result = {"command": " ".join(["python scripts/bench_finetune.py", *argv]),
              "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
              "model": {"layers": config.num_layers, "hidden": config.hidden_size,
                        "intermediate": config.intermediate_size, "heads": f"{config.num_heads}/{config.num_kv_heads} x "
                        f"{config.head_dim}", "vocab": config.vocab_size, "rope_theta": config.rope_theta,
                        "dtype": "float32", "parameters": config.num_params},
              "task": {"needle": N.NEEDLE, "question": N.QUESTION, "instruction": INSTRUCTION,
                       "haystack": N.FILLER_NAME, "train_cities": len(train_cities), "eval_cities": len(N.CITIES),
                       "ruler_tasks": args.ruler_tasks.split(",") if n_ruler else []},
              "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        tmp = pathlib.Path(tmp)
        t0 = time.perf_counter()
        init = args.init
        if init is None:
            init = tmp / "init"
            make_model(init, config, args.seed)
        data = tmp / "train.jsonl"
        lengths = write_data(data, tokenizer, haystack, train, ruler)
        check_data(data, tokenizer, build(tokenizer, haystack, *train[0])[0].ids, args.seq_len)
        if ruler:
            check_data(data, tokenizer, ruler[0][2], args.seq_len, len(train), len(N.prompt_ids(tokenizer, ruler[0][0])))
        answer_tokens = len(tokenizer.encode("\n" + train[0][0].answer)) + 1
        result["data"] = {"examples": len(lengths), "ruler_examples": n_ruler, "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
                          "prompt_tokens_mean": float(np.mean(lengths)), "seconds": time.perf_counter() - t0}
        epochs = args.steps * args.batch_size * args.seq_len / (sum(lengths) + len(lengths) * answer_tokens)
        print(f"bench_finetune: {config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size:,} "
              f"({config.num_params / 1e6:.1f}M parameters); {len(lengths)} examples ({n_ruler} RULER) of {min(lengths)}-{max(lengths)} "
              f"tokens (mean {np.mean(lengths):.0f}); {args.steps} steps x {args.batch_size} packed rows of "
              f"{args.seq_len} tokens (~{epochs:.2f} epochs), AdamW lr {args.lr:g}", flush=True)

        args.out.parent.mkdir(parents=True, exist_ok=True)
        printer = LossPrinter(args.out / "metrics.jsonl", args.print_every, args.steps)
        printer.start()
        try:
            summary = finetune(FinetuneConfig(
                model=init, data=data, out=args.out, steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=args.warmup_steps, schedule="cosine",
                optimizer="adamw", clip_norm=1.0, remat="none", loss_chunk=256, seed=args.seed, packing=True,
                progress=False))
        finally:
            printer.stop.set()
            printer.join()
    metrics = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_seconds = summary["seconds"]
    result["train"] = {"steps": args.steps, "seconds": train_seconds, "first_loss": metrics[0]["loss"],
                       "last_loss": metrics[-1]["loss"],
                       "tokens_per_s_median": float(np.median([m["tokens_per_s"] for m in metrics[1:] or metrics])),
                       "loss_curve": [[m["step"], round(m["loss"], 5)] for m in metrics]}

    t0 = time.perf_counter()
    rows = evaluate(args.out, tokenizer, haystack, held_out)
    eval_seconds = time.perf_counter() - t0
    unseen = [r for r in rows if r["city"] not in train_cities]
    result["eval"] = {"cases": len(rows), "accuracy": accuracy(rows), "correct": sum(r["correct"] for r in rows),
                      "accuracy_unseen_cities": accuracy(unseen), "unseen_city_cases": len(unseen),
                      "seconds": eval_seconds, "rows": rows}
    result.update(seconds=time.perf_counter() - began, out=str(args.out), plot=summary.get("plot"))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")

    for r in rows[:8]:
        print(f"  {r['prompt_tokens']:4d} tokens, depth {r['depth_percent']:5.1f}%, {r['city']:<11} {r['number']} -> "
              f"{r['response']!r} {'correct' if r['correct'] else 'wrong'}")
    print(f"loss {metrics[0]['loss']:.4f} (step 1) -> {metrics[-1]['loss']:.4f} (step {metrics[-1]['step']}) in "
          f"{train_seconds:.0f} s")
    print(f"held-out accuracy {result['eval']['accuracy']:.3f} ({result['eval']['correct']}/{len(rows)}; "
          f"unseen cities {'-' if not unseen else f'{accuracy(unseen):.3f} of {len(unseen)}'}) in {eval_seconds:.0f} s")
    print(f"total {result['seconds']:.0f} s; model {args.out}; summary {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
