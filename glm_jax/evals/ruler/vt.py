"""RULER's variable tracking (scripts/data/synthetic/variable_tracking.py): a chain
`VAR A = 12345`, `VAR B = VAR A`, ... (num_hops + 1 five-letter names) among noise lines; asked which
variables hold the value. One solved example of the task (its own names and value, ~500 tokens) comes
first, as RULER's few-shot."""

from __future__ import annotations

import numpy as np

from glm_jax.evals.common import largest_fitting
from glm_jax.evals.ruler.build import Draw, Rendered
from glm_jax.evals.ruler.niah import NOISE
from glm_jax.evals.ruler.tasks import VT_PREFIX, VT_TEMPLATE, Task
from glm_jax.evals.ruler.words import distinct_letters

ICL_TOKENS = 500    # RULER's example: a 500-token sample (fewer for lengths under 4,000: a quarter of the budget)


def chains(rng: np.random.Generator, num_chains: int, num_hops: int) -> tuple[list[list[str]], list[list[str]], str]:
    """(names per chain, lines per chain, the first chain's value)."""
    names = distinct_letters(rng, num_chains * (num_hops + 1), 5)
    groups, lines, first = [], [], None
    for c in range(num_chains):
        these = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        value = str(int(rng.integers(10000, 99999)))
        first = first or value
        groups.append(these)
        lines.append([f"VAR {these[0]} = {value}"] + [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(num_hops)])
    return groups, lines, first


def _text(n: int, lines: list[list[str]], fractions: list[np.ndarray]) -> tuple[str, tuple[float, ...]]:
    sentences = [NOISE] * n
    where = []
    for chain, f in zip(lines, fractions):     # each chain's lines in order, at sorted positions among the rest
        positions = sorted(int(x * len(sentences)) for x in f)
        where += [100 * x for x in sorted(f)]
        for j, (p, line) in enumerate(zip(positions, chain)):
            sentences.insert(p + j, line)
    return "\n".join(sentences).replace(". \n", ".\n"), tuple(where)


def _one(rng: np.random.Generator, task: Task):
    a = task.args
    groups, lines, value = chains(rng, a["num_chains"], a["num_hops"])
    fractions = [rng.random(len(chain)) for chain in lines]

    def render(n: int) -> Rendered:
        context, where = _text(n, lines, fractions)
        body = VT_TEMPLATE.format(context=context, query=value)
        return Rendered(body, VT_PREFIX.format(num_v=a["num_hops"] + 1, query=value), tuple(groups[0]), where)

    return render


def draw(task: Task, rng: np.random.Generator, tokenizer, budget: int) -> Draw:
    example = _one(np.random.default_rng(rng.integers(2 ** 63)), task)
    limit = min(ICL_TOKENS, budget // 4)

    def example_text(n: int) -> str:
        r = example(n)
        return r.content + r.prefix + " " + " ".join(r.answers) + "\n"

    n = largest_fitting(lambda m: len(tokenizer.encode(example_text(m), split_special_tokens=True)) <= limit,
                        limit // 25, limit) or 0
    shot = example_text(n)
    main = _one(rng, task)

    def render(units: int) -> Rendered:
        r = main(units)
        return Rendered(shot + "\n" + r.content, r.prefix, r.answers, r.depths)

    return Draw(render)
