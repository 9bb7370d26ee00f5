"""The haystack: sentences read from a file (text, JSONL or a folder of .txt) or the built-in filler,
each with its token count, and the window of them a prompt takes."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import pathlib
from collections.abc import Sequence

import numpy as np

from glm_jax.evals.text import read_haystack, split_sentences

# The classic passkey filler: the haystack when no file is given.
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FILLER_NAME = "built-in filler"

@dataclasses.dataclass(frozen=True, eq=False)
class Haystack:
    """Sentences to cut haystacks from, with each one's token count (as it follows another sentence)."""

    name: str
    sentences: tuple[str, ...]
    separators: tuple[str, ...]     # the whitespace before each sentence in the source ("" for the first)
    counts: np.ndarray              # tokens of each unit (below), an estimate of what it adds to a prompt
    repeat: bool                    # read cyclically (the filler always is)
    sha256: str

    @functools.cached_property
    def units(self) -> tuple[str, ...]:
        """Each sentence with the whitespace before it (" " where there is none: the source's first)."""
        return tuple((sep or " ") + s for sep, s in zip(self.separators, self.sentences))

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def description(self) -> str:
        if self.name == FILLER_NAME:
            return f'{FILLER_NAME} ("{" ".join(FILLER)}" repeated; no file given)'
        return f"{self.name} ({len(self.sentences):,} sentences, {self.tokens:,} tokens" + \
            (", repeated)" if self.repeat else ")")


def load_haystack(path: pathlib.Path | None, tokenizer, repeat: bool = False) -> Haystack:
    """The haystack of a file (see `read_haystack`), or the built-in filler for None."""
    if path is None:
        sentences, separators, repeat, name = list(FILLER), [""] + [" "] * (len(FILLER) - 1), True, FILLER_NAME
        text = " ".join(FILLER)
    else:
        text = read_haystack(path)
        sentences, separators = split_sentences(text)
        if not sentences:
            raise ValueError(f"haystack {path} is empty (no text)")
        name = str(path)
    units = [(sep or " ") + s for sep, s in zip(separators, sentences)]
    counts = np.array([len(ids) for ids in tokenizer.encode_batch(units, split_special_tokens=True)], np.int64)
    return Haystack(name, tuple(sentences), tuple(separators), counts, repeat,
                    hashlib.sha256(text.encode("utf-8")).hexdigest())


def window(haystack: Haystack, offset: int, n: int, values: Sequence) -> list:
    """values (per sentence) of the n sentences from offset: cyclic when the haystack repeats."""
    if haystack.repeat:
        return list(itertools.islice(itertools.cycle(values), offset % len(values), offset % len(values) + n))
    return list(values[offset:offset + n])


def available_sentences(haystack: Haystack, offset: int) -> int | None:
    """Sentences from offset on (None: unbounded, the haystack repeats)."""
    return None if haystack.repeat else len(haystack.sentences) - offset
