"""The values RULER's tasks hide: 7-digit numbers, UUIDs, adjective-noun keys, word lists from the
`wonderwords` package (RULER's own source: its nounlist, adjectivelist and verblist), and FWE's
coded words; all drawn from a numpy Generator."""

from __future__ import annotations

import functools
import importlib.resources
import string
import uuid

import numpy as np


@functools.cache
def wonderwords_list(name: str) -> tuple[str, ...]:
    """A word list of the wonderwords package: 'nounlist', 'adjectivelist' or 'verblist'."""
    try:
        text = importlib.resources.files("wonderwords.assets").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise ValueError("RULER's word lists come from the wonderwords package: pip install wonderwords") from None
    return tuple(w.strip() for w in text.splitlines() if w.strip())


def key_word(rng: np.random.Generator) -> str:
    """A NIAH key: an adjective-noun pair (RULER's `words`, drawn without building its 6-million-pair list)."""
    adjectives, nouns = wonderwords_list("adjectivelist"), wonderwords_list("nounlist")
    return f"{adjectives[int(rng.integers(len(adjectives)))]}-{nouns[int(rng.integers(len(nouns)))]}"


@functools.cache
def common_words() -> tuple[str, ...]:
    """CWE's pool: nouns, adjectives and verbs, unique, sorted."""
    return tuple(sorted(set(wonderwords_list("nounlist") + wonderwords_list("adjectivelist") +
                            wonderwords_list("verblist"))))


def random_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "numbers":
        return str(int(rng.integers(10 ** 6, 10 ** 7)))
    if kind == "words":
        return key_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def distinct_values(rng: np.random.Generator, kind: str, n: int) -> list[str]:
    """n different values (keys must not repeat: a query would be ambiguous)."""
    values: list[str] = []
    while len(values) < n:
        v = random_value(rng, kind)
        if v not in values:
            values.append(v)
    return values


def letters(rng: np.random.Generator, k: int, alphabet: str = string.ascii_uppercase) -> str:
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=k))


def distinct_letters(rng: np.random.Generator, n: int, k: int, alphabet: str = string.ascii_uppercase) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = letters(rng, k, alphabet)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def word_pool(rng: np.random.Generator, n: int) -> list[str]:
    """n different words for CWE in a seeded order: wonderwords' nouns, adjectives and verbs; past
    their 8,700-odd (RULER then takes another list, json/english_words.json, not packaged anywhere),
    adjective-noun pairs."""
    pool = list(common_words())
    order = rng.permutation(len(pool))
    words = [pool[i] for i in order[:n]]
    seen = set(words)
    while len(words) < n:
        w = key_word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words
