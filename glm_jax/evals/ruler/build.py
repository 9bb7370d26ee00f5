"""A sample's prompt: the task's user turn in GLM-4's chat format, then the answer prefix as the start
of the assistant's turn (as RULER's `chatglm-chat` template puts it after `<|assistant|>`), with the
most haystack (noise lines, essay words, distractor needles, listed words, documents) whose token
count in the model's tokenizer leaves the generation budget: prompt + max_new_tokens <= length."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from glm_jax.evals.common import largest_fitting, prompt_ids


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A sample's text with n haystack units."""

    content: str                 # the user turn
    prefix: str                  # the answer prefix: the start of the assistant's turn
    answers: tuple[str, ...]     # the reference strings
    depths: tuple[float, ...] = ()   # the needles' (chain lines') drawn depths: percent of the haystack units


@dataclasses.dataclass(frozen=True)
class Draw:
    """A sample's random choices, rendered with any number of haystack units (from `minimum`)."""

    render: Callable[[int], Rendered]
    minimum: int = 0


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: list[int]
    rendered: Rendered
    units: int                   # haystack units it holds


def assistant_start(prefix: str) -> str:
    """The assistant turn's opening: GLM-4 starts its answers on a new line."""
    return "\n" + prefix.lstrip(" ")


def sample_ids(tokenizer, rendered: Rendered) -> list[int]:
    return prompt_ids(tokenizer, rendered.content) + tokenizer.encode(assistant_start(rendered.prefix),
                                                                       split_special_tokens=True)


def fit(tokenizer, draw: Draw, budget: int, what: str) -> Sample:
    """The sample with the most haystack units whose prompt is at most `budget` tokens (exact: the
    real prompt is encoded; an estimate from two renderings, then galloping and bisection)."""
    cache: dict[int, tuple[list[int], Rendered]] = {}

    def ids(n: int) -> list[int]:
        if n not in cache:
            rendered = draw.render(draw.minimum + n)
            cache[n] = (sample_ids(tokenizer, rendered), rendered)
        return cache[n][0]

    base = len(ids(0))
    if base > budget:
        raise ValueError(f"{what}: the template, question and answer prefix alone take {base:,} tokens, over the "
                         f"{budget:,} the length leaves for the prompt")
    probe = 16
    per_unit = max(0.05, (len(ids(probe)) - base) / probe)
    estimate = int((budget - base) / per_unit)
    n = largest_fitting(lambda m: len(ids(m)) <= budget, estimate, 4 * estimate + 1024)
    return Sample(cache[n][0], cache[n][1], draw.minimum + n)
