"""RULER's needle-in-a-haystack tasks (scripts/data/synthetic/niah.py): needles
`One of the special magic {numbers|uuids} for {key} is: {value}.` hidden in a haystack of noise lines
(the passkey filler), of essay text (`--haystack`: sentences, needles at depths drawn from 40 evenly
spaced ones) or of other needles (distractors); one to four keys, values or queries."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from glm_jax.evals.ruler.build import Draw, Rendered
from glm_jax.evals.ruler.tasks import NIAH_PREFIX, NIAH_TEMPLATE, Task
from glm_jax.evals.ruler.words import distinct_values, random_value
from glm_jax.evals.text import split_sentences

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))   # essay needle depths


def essay_words(text: str) -> tuple[str, ...]:
    """The essay haystack as RULER cuts it: whitespace-separated words (taken cyclically)."""
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


def template(task: Task) -> tuple[str, str, str]:
    """(template, answer prefix, value noun): singular when one value is asked, as RULER rewrites it."""
    a = task.args
    text, noun = NIAH_TEMPLATE + "\x00" + NIAH_PREFIX, a["type_needle_v"]
    if a["num_needle_q"] * a["num_needle_v"] == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            text = text.replace(old, new)
        noun = noun[:-1]
    body, prefix = text.split("\x00")
    return body, prefix, noun


class _Distractors:
    """Haystack needles with random keys and values, the same i-th one however many are taken."""

    def __init__(self, rng: np.random.Generator, task: Task, exclude: set[str]):
        self.rng, self.task, self.exclude, self.lines = rng, task, exclude, []

    def take(self, n: int) -> list[str]:
        a = self.task.args
        while len(self.lines) < n:
            key = random_value(self.rng, a["type_needle_k"])
            if key in self.exclude:
                continue
            self.lines.append(NEEDLE.format(type_needle_v=a["type_needle_v"], key=key,
                                            value=random_value(self.rng, a["type_needle_v"])))
        return self.lines[:n]


def draw(task: Task, rng: np.random.Generator, essay: Sequence[str] | None) -> Draw:
    a = task.args
    keys = distinct_values(rng, a["type_needle_k"], a["num_needle_k"])
    values = [[random_value(rng, a["type_needle_v"]) for _ in range(a["num_needle_v"])] for _ in keys]
    needles = [NEEDLE.format(type_needle_v=a["type_needle_v"], key=k, value=v) for k, vs in zip(keys, values)
               for v in vs]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    queried = sorted(rng.choice(len(keys), size=a["num_needle_q"], replace=False).tolist())
    queries = [keys[i] for i in queried]
    answers = tuple(v for i in queried for v in values[i])
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    body, prefix, noun = template(task)
    prefix = prefix.format(type_needle_v=noun, query=query)
    kind = a["type_haystack"]
    if kind == "essay":
        if not essay:
            raise ValueError(f"{task.name} needs an essay haystack (--haystack)")
        depths = sorted(rng.choice(DEPTHS, size=len(needles), replace=False).tolist())
    else:
        fractions = sorted(rng.random(len(needles)).tolist())
    distractors = _Distractors(np.random.default_rng(rng.integers(2 ** 63)), task, set(keys)) \
        if kind == "needle" else None

    def render(n: int) -> Rendered:
        if kind == "essay":
            words = [essay[i % len(essay)] for i in range(n)]
            sentences, _ = split_sentences(" ".join(words))
            slots = [int(len(sentences) * d / 100) for d in depths]
            pieces, at = [], 0
            for slot, needle in zip(slots, needles):
                pieces.append(" ".join(sentences[at:slot]))
                pieces.append(needle)
                at = slot
            pieces.append(" ".join(sentences[at:]))
            context = " ".join(pieces)
            where = tuple(float(d) for d in depths)
        else:
            lines = [NOISE] * n if kind == "noise" else distractors.take(n)
            slots = [int(f * n) for f in fractions]
            for slot, needle in sorted(zip(slots, needles), reverse=True):
                lines.insert(slot, needle)
            context = "\n".join(lines)
            where = tuple(100 * f for f in fractions)
        content = body.format(type_needle_v=noun, context=context, query=query)
        return Rendered(content, prefix, answers, where)

    return Draw(render)
