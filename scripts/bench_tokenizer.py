"""Encode throughput of glm_jax's Tokenizer against a raw tiktoken Encoding on the same text.

Builds ~10 MB of mixed Chinese / English / code text (deterministic, no downloads), encodes it with
both, checks the ids agree, and prints MB/s, tokens/s and the ratio for each mode:

    .venv/bin/python scripts/bench_tokenizer.py [--reference tests/data] [--mb 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random

import tiktoken
import tiktoken.load

from glm_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from _bench import best_time

CHINESE = (
    "今天天气很好我们去公园散步吧人工智能模型的训练需要大量数据和计算资源语言理解与生成是自然处理的核心任务"
    "北京上海广州深圳城市交通发展经济科技教育文化历史研究报告显示用户可以通过接口调用服务"
)
CHINESE_PUNCT = "，。！？；：、"
ENGLISH = (
    "the model reads long documents and answers questions about them with tokens attention layers "
    "context window training data inference speed memory cache throughput latency benchmark results"
).split()
CODE = [
    "def {name}(x, y=None):\n    return [v * 2 for v in x if v is not None]\n",
    "for (int i = 0; i < {n}; ++i) {{\n    sum += data[i] * weights[i];\n}}\n",
    'const {name} = async (url) => {{ const r = await fetch(url); return r.json(); }};\n',
    "SELECT id, name FROM users WHERE created_at > '2024-0{n}-01' ORDER BY id;\n",
    '{{"{name}": [{n}, 2, 3], "nested": {{"ok": true, "value": null}}}}\n',
]


def make_text(megabytes: float, seed: int = 0) -> str:
    """Deterministic mixed text of about `megabytes` MB (UTF-8)."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < megabytes * 1e6:
        kind = rng.random()
        if kind < 0.4:
            chars = rng.choices(CHINESE, k=rng.randint(20, 120))
            part = "".join(c + (rng.choice(CHINESE_PUNCT) if rng.random() < 0.08 else "") for c in chars)
        elif kind < 0.8:
            part = " ".join(rng.choices(ENGLISH, k=rng.randint(10, 80))).capitalize() + "."
        elif kind < 0.99:
            part = rng.choice(CODE).format(name=f"fn_{rng.randint(0, 999)}", n=rng.randint(1, 9))
        else:
            part = rng.choice(SPECIAL_TOKENS)
        part += "\n\n" if rng.random() < 0.3 else "\n"
        parts.append(part)
        size += len(part.encode("utf-8"))
    return "".join(parts)


def main() -> None:
    reference = os.environ.get("GLM_JAX_REFERENCE") or pathlib.Path(__file__).resolve().parents[1] / "tests/data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=pathlib.Path, default=reference, help="folder holding tokenizer.model")
    parser.add_argument("--mb", type=float, default=10.0, help="size of the generated text in MB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is kept)")
    args = parser.parse_args()

    vocab = args.reference / "tokenizer.model"
    ours = Tokenizer.from_file(vocab)
    raw = tiktoken.Encoding(
        "glm4-raw",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(vocab)),
        special_tokens=ours.special_tokens,
    )
    text = make_text(args.mb)
    docs = text.split("\n\n")  # short documents for the batch mode
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"text: {megabytes:.2f} MB, {len(text):,} characters, {len(docs):,} documents; best of {args.repeats}")

    modes = [  # (name, glm_jax, raw tiktoken)
        ("encode (special tokens parsed)", lambda: ours.encode(text), lambda: raw.encode(text, allowed_special="all")),
        ("encode (split_special_tokens)", lambda: ours.encode(text, split_special_tokens=True),
         lambda: raw.encode_ordinary(text)),
        ("encode_batch (8 threads)", lambda: ours.encode_batch(docs), lambda: raw.encode_batch(docs, allowed_special="all")),
    ]
    print(f"{'mode':32} {'impl':9} {'MB/s':>8} {'Mtok/s':>8}")
    for name, ours_fn, raw_fn in modes:
        assert ours_fn() == raw_fn(), f"{name}: ids differ"
        result = ours_fn()
        tokens = sum(map(len, result)) if isinstance(result[0], list) else len(result)
        seconds = {impl: best_time(fn, args.repeats) for impl, fn in (("glm_jax", ours_fn), ("tiktoken", raw_fn))}
        for impl, s in seconds.items():
            print(f"{name:32} {impl:9} {megabytes / s:8.2f} {tokens / s / 1e6:8.3f}")
        ratio = seconds["tiktoken"] / seconds["glm_jax"]
        print(f"{name:32} {'ratio':9} {ratio:8.3f}  (glm_jax speed / tiktoken speed; {tokens:,} tokens)")


if __name__ == "__main__":
    main()
