"""The haystack: sentences read from a file (text, JSONL or a folder of .txt) or the built-in filler,
each with its token count, and the window of them a prompt takes."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np

# The classic passkey filler: the haystack when no file is given.
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FILLER_NAME = "built-in filler"

# Where a sentence ends: the whitespace after . ! ? (and a closing quote or bracket), any whitespace
# holding a line break, or right after a CJK full stop (no space follows those).
_BOUNDARY = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u2019\u201d)\]]))\s+"
    r"|\s*\n\s*"
    r"|(?<=[\u3002\uff01\uff1f])(?![\u300d\u300f\u201d\u2019\uff09])\s*"
    r"|(?<=[\u3002\uff01\uff1f][\u300d\u300f\u201d\u2019\uff09])\s*")


def split_sentences(text: str) -> tuple[list[str], list[str]]:
    """(sentences, separators): separators[i] is the whitespace before sentences[i] ("" for the first),
    so that `"".join(sep + s for ...)` gives back the text, stripped."""
    text = text.strip()
    sentences, separators, start, sep = [], [], 0, ""
    for m in _BOUNDARY.finditer(text):
        if m.start() > start:
            sentences.append(text[start:m.start()])
            separators.append(sep)
            sep = ""
        sep += m.group()
        start = m.end()
    if start < len(text):
        sentences.append(text[start:])
        separators.append(sep)
    if separators:
        separators[0] = ""
    return sentences, separators


def read_haystack(path: pathlib.Path) -> str:
    """The text of a haystack file: plain UTF-8 text; JSONL (`.jsonl`) with a `text` field on each
    line (records joined by blank lines); or a folder of `.txt` files (by name, joined likewise)."""
    path = pathlib.Path(path)
    try:
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise ValueError(f"haystack folder {path} holds no .txt files")
            return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read haystack {path}: {e}") from None
    if path.suffix.lower() != ".jsonl":
        return text
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
        records.append(record["text"])
    return "\n\n".join(records)


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
