"""The needles and the prompt: one user turn of the chat template holding the most haystack
sentences that keep it within a context length (exact: found by encoding the real prompt), the
needles at the sentence boundaries nearest to their depths."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from glm_jax.evals.common import largest_fitting, prompt_ids
from glm_jax.evals.needle.haystack import Haystack, available_sentences, window

NEEDLE = "The special magic {city} number is: {number}."
QUESTION = "What is the special magic {city} number?"
# LWM's instruction after the question (scripts/eval_needle.py).
INSTRUCTION = ("Don't give information outside the document or repeat your findings. "
               "Keep your response short and direct.")


@dataclasses.dataclass(frozen=True)
class Needle:
    city: str
    number: int
    depth: float          # percent of the haystack before it

    @property
    def text(self) -> str:
        return NEEDLE.format(city=self.city, number=self.number)

    @property
    def answer(self) -> str:
        return str(self.number)

    def question(self, instruction: str = INSTRUCTION) -> str:
        return f"{QUESTION.format(city=self.city)} {instruction}".strip()


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str                               # the rendered prompt; the ids decode to exactly this
    needle_token_indices: tuple[int, ...]   # per needle (depth order): the token holding its first character
    haystack_sentences: int


def needle_depths(depth: float, k: int) -> list[float]:
    """K needle depths: d, d + 100/K, ... with those over 100 wrapped round (minus 100); sorted."""
    return sorted(round(x - 100 if x > 100 else x, 6) for x in (depth + 100 * j / k for j in range(k)))


def _template_head(tokenizer) -> str:
    """The rendered template before the user's content."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    return text[:text.index("\x00")]


def build_prompt(tokenizer, haystack: Haystack, length: int, needles: Sequence[Needle], question: str,
                 offset: int = 0) -> Prompt:
    """The prompt with the most haystack sentences (from `offset`) whose token count is <= length.

    Exact: the count is that of the real prompt's ids. Needles go at the sentence boundary nearest to
    their depth (percent of the haystack's estimated tokens), in depth order."""
    needles = sorted(needles, key=lambda x: x.depth)
    head = _template_head(tokenizer)

    # An estimate from the sentences' token counts, so that a few real encodings settle it.
    base = len(prompt_ids(tokenizer, render(haystack, offset, 0, needles, question, None)[0]))
    if base > length:
        raise ValueError(f"context length {length:,} is too short: the chat template, question and "
                         f"needle{'s' if len(needles) > 1 else ''} alone take {base:,} tokens")
    limit = available_sentences(haystack, offset)
    if limit is None:   # enough sentences to be sure to pass the length twice over
        limit = int(math.ceil((2 * length + 64) / max(1.0, haystack.counts.min()))) + 1
    if haystack.repeat:
        reps = -(-(offset % len(haystack.counts) + limit) // len(haystack.counts))
        counts = np.tile(haystack.counts, reps)[offset % len(haystack.counts):][:limit]
    else:
        counts = haystack.counts[offset:offset + limit]
    prefix = np.concatenate([[0], np.cumsum(counts)])
    limit = min(limit, int(np.searchsorted(prefix, 2 * length + 64, side="right")))

    cache: dict[int, tuple[list[int], str, list[int]]] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            content, starts = render(haystack, offset, n, needles, question, prefix)
            cache[n] = (prompt_ids(tokenizer, content), content, starts)
        return len(cache[n][0]) <= length

    n = int(np.searchsorted(prefix, length - base, side="right")) - 1     # the estimate
    n = max(0, min(n, limit))
    lo = largest_fitting(fits, n, limit) or 0      # fits(0): checked above
    fits(lo)
    ids, content, starts = cache[lo]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    indices = tuple(_token_at(tokenizer, ids, len((head + content[:s]).encode("utf-8"))) for s in starts)
    return Prompt(ids, text, indices, lo)


def render(haystack: Haystack, offset: int, n: int, needles: Sequence[Needle], question: str,
            prefix: np.ndarray | None) -> tuple[str, list[int]]:
    """(the user turn's content, each needle's character offset in it) with n haystack sentences."""
    units = window(haystack, offset, n, haystack.units)
    if n and prefix is not None:
        marks = prefix[:n + 1]
        slots = []
        for needle in needles:     # the boundary nearest to depth% of the tokens (ties: the earlier)
            target = needle.depth / 100 * marks[-1]
            k = int(np.searchsorted(marks, target))
            if k > 0 and target - marks[k - 1] <= marks[k] - target:
                k -= 1
            slots.append(k)
    else:
        slots = [0] * len(needles)
    pieces, starts, at = [], [], 0
    for k, needle in zip(slots, needles):
        pieces += units[at:k]
        starts.append(len(pieces))
        pieces.append(" " + needle.text)
        at = k
    pieces += units[at:]
    lead = len(pieces[0]) - len(pieces[0].lstrip())
    lengths = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    content = "".join(pieces)[lead:] + "\n\n" + question
    return content, [int(lengths[i]) + 1 - lead for i in starts]


def _token_at(tokenizer, ids: list[int], byte: int) -> int:
    """The index of the token whose bytes hold the prompt's byte offset `byte`."""
    lo, hi = 0, len(ids)    # largest p with len(decode(ids[:p])) <= byte
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(tokenizer.decode_bytes(ids[:mid])) <= byte else (lo, mid)
    return lo
