"""RULER's metrics (scripts/eval/synthetic/constants.py) on one response, in 0..1 (RULER reports the
mean x 100): `string_match_all`, the share of the references found in the response, case-insensitively
(the synthetic tasks); `string_match_part`, 1 when any reference is found (QA). The response is first
cleaned as RULER's `postprocess_pred` does (control characters to line breaks, stripped)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean(response: str) -> str:
    return _CONTROL.sub("\n", response.strip()).strip()


def string_match_all(response: str, references: Sequence[str]) -> float:
    text = clean(response).lower()
    return sum(r.lower() in text for r in references) / len(references) if references else 0.0


def string_match_part(response: str, references: Sequence[str]) -> float:
    text = clean(response).lower()
    return float(max((r.lower() in text for r in references), default=False))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(metric: str, response: str, references: Sequence[str]) -> float:
    return METRICS[metric](response, references)
