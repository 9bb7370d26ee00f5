"""The grid: context lengths and depths from the command's arguments, and every (length, depth,
sample) of it as a seeded Case (cities, numbers, haystack offset)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from glm_jax.evals.common import parse_numbers
from glm_jax.evals.needle.haystack import Haystack
from glm_jax.evals.needle.prompt import INSTRUCTION, Needle, needle_depths, prompt_ids, render

# The cities of scripts/bench_finetune.py (a tiny model trained there has seen most of them).
CITIES = (
    "Tokyo", "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon",
    "Dublin", "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Athens", "Istanbul",
    "Cairo", "Nairobi", "Lagos", "Casablanca", "Dubai", "Mumbai", "Delhi", "Bangkok", "Singapore", "Jakarta",
    "Manila", "Seoul", "Beijing", "Shanghai", "Sydney", "Melbourne", "Auckland", "Toronto", "Montreal", "Vancouver",
    "Chicago", "Boston", "Seattle", "Denver", "Houston", "Miami", "Lima", "Bogota", "Santiago", "Havana",
)  # fmt: skip
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)


@dataclasses.dataclass(frozen=True)
class Case:
    """One cell's sample: its needles (depth order) and where its haystack starts."""

    context_length: int
    depth_percent: float
    sample: int
    needles: tuple[Needle, ...]
    offset: int


def case_rng(seed: int, length: int, depth: float, sample: int) -> np.random.Generator:
    return np.random.default_rng([seed, length, int(round(depth * 1000)), sample])


def plan_cases(tokenizer, haystack: Haystack, lengths: Sequence[int], depths: Sequence[float], samples: int,
               multi_needle: int = 1, seed: int = 0, instruction: str = INSTRUCTION) -> list[Case]:
    """Every (length, depth, sample) of the grid, in that order, with its seeded cities, numbers and
    haystack offset. Raises ValueError for a length too short for the template, question and needles,
    and for a haystack too short for a length (unless it repeats)."""
    cases = []
    total = haystack.tokens
    suffix = np.cumsum(haystack.counts[::-1])[::-1]     # tokens from each sentence to the end
    for length in lengths:
        for depth in depths:
            for sample in range(samples):
                rng = case_rng(seed, length, depth, sample)
                cities = rng.choice(len(CITIES), size=multi_needle, replace=False)
                numbers = rng.choice(9_000_000, size=multi_needle, replace=False) + 1_000_000
                where = float(rng.random())
                needles = tuple(Needle(CITIES[c], int(x), d)
                                for c, x, d in zip(cities, numbers, needle_depths(depth, multi_needle)))
                # What the template, question and needles take; the haystack gives the rest.
                overhead = min(len(prompt_ids(tokenizer, render(haystack, 0, 0, needles, n.question(instruction),
                                                                 None)[0])) for n in needles)
                if overhead > length:
                    raise ValueError(f"context length {length:,} is too short: the chat template, question "
                                     f"and needle{'s' if multi_needle > 1 else ''} alone take {overhead:,} tokens")
                needed = length - overhead
                if haystack.repeat:
                    offset = int(where * len(haystack.sentences))
                else:
                    if total < needed:
                        raise ValueError(f"haystack {haystack.name} has {total:,} tokens; context length "
                                         f"{length:,} needs {needed:,} (or repeat it: --repeat-haystack)")
                    # offsets that leave the haystack enough tokens (and a sentence to spare) for the length
                    last = max(0, int(np.searchsorted(-suffix, -(needed + int(haystack.counts.max())),
                                                      side="right")) - 1)
                    offset = int(where * (last + 1))
                cases.append(Case(int(length), float(depth), sample, needles, offset))
    return cases


def parse_depths(depths: str | None, num: int | None = None) -> list[float]:
    """--depths 0,25,50 (percent) or --num-depths N (spread from 0 to 100): sorted, unique."""
    if depths is not None and num is not None:
        raise ValueError("give either --depths or --num-depths, not both")
    if depths is not None:
        values = parse_numbers(depths, "--depths", float)
    elif num is not None:
        if num < 1:
            raise ValueError(f"--num-depths must be at least 1, got {num}")
        values = [round(float(v), 1) for v in np.linspace(0, 100, num)] if num > 1 else [50.0]
    else:
        values = list(DEFAULT_DEPTHS)
    bad = [v for v in values if not 0 <= v <= 100]
    if bad:
        raise ValueError(f"depths are percentages in 0..100, got {bad[0]:g}")
    return sorted(set(values))
