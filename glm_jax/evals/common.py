"""What the evaluations share: the model's config without its weights, the context lengths of the
command line, the chat-format prompt and the search for the longest prompt within a budget."""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable

import numpy as np


def log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def model_config(folder: pathlib.Path):
    """The GLMConfig of a glm-jax or HF model folder, from config.json alone (no weights read)."""
    from glm_jax.config import GLMConfig

    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a glm-jax or Hugging Face model folder)")
    try:
        kind = json.loads(path.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    return GLMConfig.load(path) if kind == "glm_jax" else GLMConfig.from_hf(path)


def parse_numbers(text: str, flag: str, kind) -> list:
    values = []
    for part in text.split(","):
        try:
            values.append(kind(part.strip()))
        except ValueError:
            raise ValueError(f"{flag}: {part.strip()!r} is not a{'n integer' if kind is int else ' number'}") from None
    return values


def parse_lengths(lengths: str | None, minimum: int | None = None, maximum: int | None = None,
                  num: int | None = None) -> list[int]:
    """--lengths 1000,8000 or --min-length/--max-length/--num-lengths (linear, rounded): sorted, unique."""
    linear = (minimum, maximum, num)
    if lengths is not None:
        if any(v is not None for v in linear):
            raise ValueError("give either --lengths or --min-length/--max-length/--num-lengths, not both")
        values = parse_numbers(lengths, "--lengths", int)
    elif all(v is not None for v in linear):
        if num < 1:
            raise ValueError(f"--num-lengths must be at least 1, got {num}")
        if minimum > maximum:
            raise ValueError(f"--min-length {minimum} is above --max-length {maximum}")
        values = [int(round(v)) for v in np.linspace(minimum, maximum, num)]
    else:
        raise ValueError("give the context lengths: --lengths 1000,8000,... or --min-length, --max-length "
                         "and --num-lengths")
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"context lengths must be positive, got {bad[0]}")
    return sorted(set(values))


def prompt_ids(tokenizer, content: str) -> list[int]:
    """One user turn of the chat template, generation prompt included; content encoded as text."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         split_special_tokens=True)


def largest_fitting(fits: Callable[[int], bool], estimate: int, limit: int) -> int | None:
    """The largest n in 0..limit with fits(n), for fits true up to some n and false beyond: galloping
    from the estimate, then bisection (a few calls of fits). None when not even fits(0)."""
    n = max(0, min(estimate, limit))
    step = 1
    if fits(n):
        lo, hi = n, limit + 1
        while True:
            probe = lo + step
            if probe > limit:
                break
            if not fits(probe):
                hi = probe
                break
            lo, step = probe, step * 2
    else:
        hi = n
        while True:
            probe = hi - step
            if probe <= 0:
                if not fits(0):
                    return None
                lo = 0
                break
            if fits(probe):
                lo = probe
                break
            hi, step = probe, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def load_model(c):
    """An evaluation's model: the folder `c.model` loaded with its runtime settings (dtype, mesh,
    prefill chunk, weight quantization, KV cache dtype and page pool)."""
    import glm_jax

    return glm_jax.load(c.model, dtype=c.dtype, mesh=c.mesh, prefill_chunk=c.prefill_chunk, quantize=c.quantize,
                        kv_cache_dtype=c.kv_cache_dtype, page_size=c.page_size, kv_cache_tokens=c.kv_cache_tokens,
                        kv_cache_memory=c.kv_cache_memory)
