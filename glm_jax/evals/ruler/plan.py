"""The grid: every (task, length, sample) and its prompt, built on demand from a generator seeded by
(seed, task, length, sample): a cell's prompts do not depend on the rest of the grid."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from glm_jax.evals.ruler import aggregation, niah, qa, vt
from glm_jax.evals.ruler.build import Sample, fit
from glm_jax.evals.ruler.tasks import TASKS, Task


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the generators read besides the seed: the essay haystack's words, the QA files."""

    essay: Sequence[str] = ()
    qa: dict[str, qa.QAData] = dataclasses.field(default_factory=dict)


def new_tokens(task: Task, override: int | None) -> int:
    """The generation budget: RULER's per kind (128 NIAH, 30 VT, 120 CWE, 50 FWE, 32 QA) unless overridden."""
    return task.tokens_to_generate if override is None else override


def sample_rng(seed: int, task: Task, length: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([seed, task.seed_key, length, sample])


def make_sample(tokenizer, name: str, length: int, sample: int, inputs: Inputs, seed: int = 0,
                max_new_tokens: int | None = None) -> Sample:
    """The prompt of one (task, length, sample): at most length - max_new_tokens tokens, the most
    haystack that allows. Raises ValueError for a length too short for the task's template."""
    task = TASKS[name]
    budget = length - new_tokens(task, max_new_tokens)
    rng = sample_rng(seed, task, length, sample)
    if task.kind == "niah":
        draw = niah.draw(task, rng, inputs.essay)
    elif task.kind == "variable_tracking":
        draw = vt.draw(task, rng, tokenizer, max(budget, 0))
    elif task.kind == "common_words_extraction":
        draw = aggregation.draw_cwe(task, rng, length, max(budget, 0))
    elif task.kind == "freq_words_extraction":
        draw = aggregation.draw_fwe(task, rng, max(budget, 0))
    else:
        draw = qa.draw(inputs.qa[task.args["dataset"]], sample, rng)
    return fit(tokenizer, draw, budget, f"{name} at length {length:,}")


def grid(tasks: Sequence[str], lengths: Sequence[int], samples: int) -> list[tuple[str, int, int]]:
    """Every (task, length, sample), by length, then task, then sample."""
    return [(t, n, s) for n in lengths for t in tasks for s in range(samples)]
