"""Haystack text: read from a file (plain text, JSONL or a folder of .txt) and split into sentences.
Shared by the evaluations (`needle`, `ruler`)."""

from __future__ import annotations

import json
import pathlib
import re

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
