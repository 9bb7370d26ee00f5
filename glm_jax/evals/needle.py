"""`glm-jax needle`: needle in a haystack (LWM's protocol) in GLM-4's own chat format.

Every prompt is one user turn of the chat template, generation prompt included:

    [gMASK]<sop><|user|>
    {haystack sentences, with the needle(s) `The special magic {city} number is: {number}.` among them}

    What is the special magic {city} number? {instruction}<|assistant|>

- `context_length` counts the whole prompt in the model's tokens. The haystack is the most sentences,
  from the sample's offset on, that keep the prompt within it: found by encoding the real prompt
  (a token-count estimate, then a search over whole sentences), so it is exact, never over, and one
  more sentence would be over.
- A needle at depth d sits at the sentence boundary nearest to d% of the haystack's tokens (0: before
  the first sentence, 100: after the last). `--multi-needle K` puts K needles (different cities) at
  depths d, d + 100/K, d + 200/K, ... (those over 100 wrap round to d - 100 + ...: evenly spread,
  one of them at the cell's depth d) and asks for each in turn: K prompts, K result lines.
- Greedy decoding, `max_new_tokens` at most; a response is correct when it contains the number
  (a substring, as LWM scores).
- Samples repeat a cell with other cities, numbers and haystack offsets, all drawn from a generator
  seeded by (seed, length, depth, sample): a cell's prompts do not depend on the rest of the grid.

OUT gets config.json (the arguments the results depend on: a rerun with the same ones resumes,
other ones are refused unless forced), results.jsonl (a line per cell, sample and question, appended
as each finishes), summary.json and heatmap.png.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

NEEDLE = "The special magic {city} number is: {number}."
QUESTION = "What is the special magic {city} number?"
# LWM's instruction after the question (scripts/eval_needle.py).
INSTRUCTION = ("Don't give information outside the document or repeat your findings. "
               "Keep your response short and direct.")
# The classic passkey filler: the haystack when no file is given.
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FILLER_NAME = "built-in filler"
# The cities of scripts/bench_finetune.py (a tiny model trained there has seen most of them).
CITIES = (
    "Tokyo", "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon",
    "Dublin", "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Brussels", "Zurich", "Athens", "Istanbul",
    "Cairo", "Nairobi", "Lagos", "Casablanca", "Dubai", "Mumbai", "Delhi", "Bangkok", "Singapore", "Jakarta",
    "Manila", "Seoul", "Beijing", "Shanghai", "Sydney", "Melbourne", "Auckland", "Toronto", "Montreal", "Vancouver",
    "Chicago", "Boston", "Seattle", "Denver", "Houston", "Miami", "Lima", "Bogota", "Santiago", "Havana",
)  # fmt: skip
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
CONFIG, RESULTS, SUMMARY, HEATMAP = "config.json", "results.jsonl", "summary.json", "heatmap.png"
OWN_FILES = (CONFIG, RESULTS, SUMMARY, HEATMAP)
PREFILL_BAR_TOKENS = 65536   # prompts at least this long show the prefill progress bar

# Where a sentence ends: the whitespace after . ! ? (and a closing quote or bracket), any whitespace
# holding a line break, or right after a CJK full stop (no space follows those).
_BOUNDARY = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u2019\u201d)\]]))\s+"
    r"|\s*\n\s*"
    r"|(?<=[\u3002\uff01\uff1f])(?![\u300d\u300f\u201d\u2019\uff09])\s*"
    r"|(?<=[\u3002\uff01\uff1f][\u300d\u300f\u201d\u2019\uff09])\s*")


# -- the haystack -----------------------------------------------------------------------------------

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


# -- needles, prompts and cases --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Needle:
    city: str
    number: int
    depth: float          # percent of the haystack before it

    @property
    def text(self) -> str:
        return NEEDLE.format(city=self.city, number=self.number)

    @property
    def answer(self) -> str:
        return str(self.number)

    def question(self, instruction: str = INSTRUCTION) -> str:
        return f"{QUESTION.format(city=self.city)} {instruction}".strip()


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str                               # the rendered prompt; the ids decode to exactly this
    needle_token_indices: tuple[int, ...]   # per needle (depth order): the token holding its first character
    haystack_sentences: int


def needle_depths(depth: float, k: int) -> list[float]:
    """K needle depths: d, d + 100/K, ... with those over 100 wrapped round (minus 100); sorted."""
    return sorted(round(x - 100 if x > 100 else x, 6) for x in (depth + 100 * j / k for j in range(k)))


def prompt_ids(tokenizer, content: str) -> list[int]:
    """One user turn of the chat template, generation prompt included; content encoded as text."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         split_special_tokens=True)


def _template_head(tokenizer) -> str:
    """The rendered template before the user's content."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    return text[:text.index("\x00")]


def _sequence(haystack: Haystack, offset: int, n: int, values: Sequence) -> list:
    """values (per sentence) of the n sentences from offset: cyclic when the haystack repeats."""
    if haystack.repeat:
        return list(itertools.islice(itertools.cycle(values), offset % len(values), offset % len(values) + n))
    return list(values[offset:offset + n])


def available_sentences(haystack: Haystack, offset: int) -> int | None:
    """Sentences from offset on (None: unbounded, the haystack repeats)."""
    return None if haystack.repeat else len(haystack.sentences) - offset


def build_prompt(tokenizer, haystack: Haystack, length: int, needles: Sequence[Needle], question: str,
                 offset: int = 0) -> Prompt:
    """The prompt with the most haystack sentences (from `offset`) whose token count is <= length.

    Exact: the count is that of the real prompt's ids. Needles go at the sentence boundary nearest to
    their depth (percent of the haystack's estimated tokens), in depth order."""
    needles = sorted(needles, key=lambda x: x.depth)
    head = _template_head(tokenizer)

    # An estimate from the sentences' token counts, so that a few real encodings settle it.
    base = len(prompt_ids(tokenizer, _render(haystack, offset, 0, needles, question, None)[0]))
    if base > length:
        raise ValueError(f"context length {length:,} is too short: the chat template, question and "
                         f"needle{'s' if len(needles) > 1 else ''} alone take {base:,} tokens")
    limit = available_sentences(haystack, offset)
    if limit is None:   # enough sentences to be sure to pass the length twice over
        limit = int(math.ceil((2 * length + 64) / max(1.0, haystack.counts.min()))) + 1
    if haystack.repeat:
        reps = -(-(offset % len(haystack.counts) + limit) // len(haystack.counts))
        counts = np.tile(haystack.counts, reps)[offset % len(haystack.counts):][:limit]
    else:
        counts = haystack.counts[offset:offset + limit]
    prefix = np.concatenate([[0], np.cumsum(counts)])
    limit = min(limit, int(np.searchsorted(prefix, 2 * length + 64, side="right")))

    cache: dict[int, tuple[list[int], str, list[int]]] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            content, starts = _render(haystack, offset, n, needles, question, prefix)
            cache[n] = (prompt_ids(tokenizer, content), content, starts)
        return len(cache[n][0]) <= length

    n = int(np.searchsorted(prefix, length - base, side="right")) - 1     # the estimate
    n = max(0, min(n, limit))
    lo, hi = _bracket(fits, n, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    fits(lo)
    ids, content, starts = cache[lo]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    indices = tuple(_token_at(tokenizer, ids, len((head + content[:s]).encode("utf-8"))) for s in starts)
    return Prompt(ids, text, indices, lo)


def _bracket(fits, n: int, limit: int) -> tuple[int, int]:
    """(lo, hi): fits(lo), and hi = limit + 1 or not fits(hi); galloping from the estimate n."""
    step = 1
    if fits(n):
        lo = n
        while True:
            probe = lo + step
            if probe > limit:
                return lo, limit + 1
            if not fits(probe):
                return lo, probe
            lo, step = probe, step * 2
    hi = n
    while True:
        probe = hi - step
        if probe <= 0:
            return 0, hi      # fits(0): checked by the caller
        if fits(probe):
            return probe, hi
        hi, step = probe, step * 2


def _render(haystack: Haystack, offset: int, n: int, needles: Sequence[Needle], question: str,
            prefix: np.ndarray | None) -> tuple[str, list[int]]:
    """(the user turn's content, each needle's character offset in it) with n haystack sentences."""
    units = _sequence(haystack, offset, n, haystack.units)
    if n and prefix is not None:
        marks = prefix[:n + 1]
        slots = []
        for needle in needles:     # the boundary nearest to depth% of the tokens (ties: the earlier)
            target = needle.depth / 100 * marks[-1]
            k = int(np.searchsorted(marks, target))
            if k > 0 and target - marks[k - 1] <= marks[k] - target:
                k -= 1
            slots.append(k)
    else:
        slots = [0] * len(needles)
    pieces, starts, at = [], [], 0
    for k, needle in zip(slots, needles):
        pieces += units[at:k]
        starts.append(len(pieces))
        pieces.append(" " + needle.text)
        at = k
    pieces += units[at:]
    lead = len(pieces[0]) - len(pieces[0].lstrip())
    lengths = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    content = "".join(pieces)[lead:] + "\n\n" + question
    return content, [int(lengths[i]) + 1 - lead for i in starts]


def _token_at(tokenizer, ids: list[int], byte: int) -> int:
    """The index of the token whose bytes hold the prompt's byte offset `byte`."""
    lo, hi = 0, len(ids)    # largest p with len(decode(ids[:p])) <= byte
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(tokenizer.decode_bytes(ids[:mid])) <= byte else (lo, mid)
    return lo


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
                overhead = min(len(prompt_ids(tokenizer, _render(haystack, 0, 0, needles, n.question(instruction),
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


def is_correct(answer: str, response: str) -> bool:
    """LWM's rule: the number appears in the response."""
    return str(answer) in response


def result_key(row: dict) -> tuple[int, float, int, int]:
    return int(row["context_length"]), float(row["depth_percent"]), int(row["sample"]), int(row.get("needle", 0))


# -- grid arguments --------------------------------------------------------------------------------

def _numbers(text: str, flag: str, kind) -> list:
    values = []
    for part in text.split(","):
        try:
            values.append(kind(part.strip()))
        except ValueError:
            raise ValueError(f"{flag}: {part.strip()!r} is not a{'n integer' if kind is int else ' number'}") from None
    return values


def parse_lengths(lengths: str | None, minimum: int | None = None, maximum: int | None = None,
                  num: int | None = None) -> list[int]:
    """--lengths 1000,8000 or --min-length/--max-length/--num-lengths (linear, rounded): sorted, unique."""
    linear = (minimum, maximum, num)
    if lengths is not None:
        if any(v is not None for v in linear):
            raise ValueError("give either --lengths or --min-length/--max-length/--num-lengths, not both")
        values = _numbers(lengths, "--lengths", int)
    elif all(v is not None for v in linear):
        if num < 1:
            raise ValueError(f"--num-lengths must be at least 1, got {num}")
        if minimum > maximum:
            raise ValueError(f"--min-length {minimum} is above --max-length {maximum}")
        values = [int(round(v)) for v in np.linspace(minimum, maximum, num)]
    else:
        raise ValueError("give the context lengths: --lengths 1000,8000,... or --min-length, --max-length "
                         "and --num-lengths")
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"context lengths must be positive, got {bad[0]}")
    return sorted(set(values))


def parse_depths(depths: str | None, num: int | None = None) -> list[float]:
    """--depths 0,25,50 (percent) or --num-depths N (spread from 0 to 100): sorted, unique."""
    if depths is not None and num is not None:
        raise ValueError("give either --depths or --num-depths, not both")
    if depths is not None:
        values = _numbers(depths, "--depths", float)
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


# -- OUT: config, results, summary, heatmap --------------------------------------------------------

def read_results(path: pathlib.Path, truncate: bool = False) -> list[dict]:
    """The finished lines of results.jsonl (a last line cut short by a kill is dropped, and with
    `truncate` removed from the file); the first of duplicate keys."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if truncate and len(complete) != len(data):
        path.write_bytes(complete)
    rows, seen = [], set()
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = result_key(row)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: not a result line ({e}); --force starts afresh") from None
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def check_out(out: pathlib.Path, config: dict, force: bool) -> None:
    """Refuses an OUT that holds another run (other arguments, or files that are not a needle run's)
    unless forced. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if force or not out.is_dir():
        return
    saved = out / CONFIG
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise ValueError(f"{saved} is not a needle run's config; --force starts afresh")
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(f"{out} holds results of other arguments ({', '.join(changed)}); "
                             f"--force starts afresh")
    elif any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no needle run ({CONFIG}); --force writes there anyway")


def start_out(out: pathlib.Path, config: dict, force: bool) -> list[dict]:
    """Makes OUT ready (config.json; with force, this run's files removed first); the finished rows."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / CONFIG
    if force or not saved.is_file():
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
        saved.write_text(json.dumps(config, indent=2) + "\n")
    return read_results(out / RESULTS, truncate=True)


def append_result(path: pathlib.Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summarize(rows: Sequence[dict], config: dict) -> dict[str, Any]:
    """Accuracy overall, per length, per depth, per cell (and per needle depth with several needles)."""
    lengths, depths = config["lengths"], config["depths"]
    total = len(lengths) * len(depths) * config["samples"] * config["multi_needle"]

    def mean(group):
        return float(np.mean([r["correct"] for r in group])) if group else None

    def by(key, values):
        return {f"{v:g}" if isinstance(v, float) else str(v): mean([r for r in rows if key(r) == v]) for v in values}

    cells = []
    for d in depths:
        for n in lengths:
            group = [r for r in rows if r["context_length"] == n and r["depth_percent"] == d]
            cells.append({"context_length": n, "depth_percent": d, "results": len(group), "accuracy": mean(group)})
    summary = {"model": config["model"], "haystack": config["haystack"], "lengths": lengths, "depths": depths,
               "samples": config["samples"], "multi_needle": config["multi_needle"],
               "prompts": total, "done": len(rows), "complete": len(rows) >= total,
               "accuracy": mean(rows), "by_length": by(lambda r: r["context_length"], lengths),
               "by_depth": by(lambda r: r["depth_percent"], depths), "cells": cells}
    if config["multi_needle"] > 1:
        needle_depths_ = sorted({r["needle_depth_percent"] for r in rows})
        summary["by_needle_depth"] = by(lambda r: r["needle_depth_percent"], needle_depths_)
    speeds = [r["prefill_tokens_per_s"] for r in rows if r.get("prefill_tokens_per_s")]
    summary["prefill_tokens_per_s_median"] = float(np.median(speeds)) if speeds else None
    return summary


def accuracy_grid(summary: dict) -> np.ndarray:
    """[depth, length] mean scores (NaN where a cell has no results yet)."""
    grid = np.full((len(summary["depths"]), len(summary["lengths"])), np.nan)
    for cell in summary["cells"]:
        if cell["accuracy"] is not None:
            grid[summary["depths"].index(cell["depth_percent"]),
                 summary["lengths"].index(cell["context_length"])] = cell["accuracy"]
    return grid


def plot_heatmap(summary: dict, png: pathlib.Path) -> str | None:
    """Depth (rows) x context length (columns), red (0) to green (1); None without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    grid = accuracy_grid(summary)
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#d9d9d9")
    rows, cols = grid.shape
    fig, ax = plt.subplots(figsize=(min(18, max(6, 0.7 * cols + 3)), min(12, max(3.5, 0.45 * rows + 2))))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    if rows * cols <= 400:
        for i, j in itertools.product(range(rows), range(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(cols), [f"{n:,}" for n in summary["lengths"]], rotation=45 if cols > 8 else 0, ha="right"
                  if cols > 8 else "center")
    ax.set_yticks(range(rows), [f"{d:g}" for d in summary["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth (%)")
    mean = summary["accuracy"]
    needles = f", {summary['multi_needle']} needles" if summary["multi_needle"] > 1 else ""
    ax.set_title(f"{pathlib.Path(summary['model']).name}: needle in a haystack{needles}\n"
                 f"mean {'-' if mean is None else f'{mean:.3f}'} ({summary['done']}/{summary['prompts']} prompts)")
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return str(png)


def write_summary(out: pathlib.Path, rows: Sequence[dict], config: dict) -> dict:
    summary = summarize(rows, config)
    summary["heatmap"] = plot_heatmap(summary, out / HEATMAP) if rows else None
    summary["results"] = str(out / RESULTS)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    lengths = summary["lengths"]
    width = max(7, *(len(f"{n:,}") + 1 for n in lengths))
    lines = [f"needle in a haystack: {summary['model']}",
             f"haystack: {summary['haystack']}",
             f"{'depth':>8}" + "".join(f"{n:>{width},}" for n in lengths)]
    grid = accuracy_grid(summary)
    for d, row in zip(summary["depths"], grid):
        lines.append(f"{d:>7g}%" + "".join(f"{'-' if np.isnan(x) else f'{x:.2f}':>{width}}" for x in row))
    lines.append(f"{'mean':>8}" + "".join(f"{'-' if v is None else f'{v:.2f}':>{width}}"
                                         for v in summary["by_length"].values()))
    mean = summary["accuracy"]
    lines.append(f"accuracy {'-' if mean is None else f'{mean:.3f}'} over {summary['done']}/{summary['prompts']} "
                 f"prompts" + ("" if summary["complete"] else " (incomplete: rerun the same command to finish)"))
    lines.append(f"results: {summary['results']}; heatmap: {summary['heatmap']}")
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NeedleConfig:
    model: pathlib.Path
    out: pathlib.Path
    lengths: Sequence[int]
    depths: Sequence[float] = DEFAULT_DEPTHS
    haystack: pathlib.Path | None = None
    repeat_haystack: bool = False
    samples: int = 1
    seed: int = 0
    multi_needle: int = 1
    instruction: str = INSTRUCTION
    max_new_tokens: int = 32
    dtype: str | None = None
    mesh: str | None = None
    prefill_chunk: int = 512
    kv_cache_dtype: str | None = None
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        for flag, value in (("--samples", self.samples), ("--multi-needle", self.multi_needle),
                            ("--max-new-tokens", self.max_new_tokens), ("--prefill-chunk", self.prefill_chunk)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.multi_needle > len(CITIES):
            raise ValueError(f"--multi-needle: at most {len(CITIES)} needles (one per city), got {self.multi_needle}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("context lengths must be positive")
        bad = [d for d in self.depths if not 0 <= d <= 100]
        if bad:
            raise ValueError(f"depths are percentages in 0..100, got {bad[0]:g}")


def model_config(folder: pathlib.Path):
    """The GLMConfig of a glm-jax or HF model folder, from config.json alone (no weights read)."""
    from glm_jax.config import GLMConfig

    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a glm-jax or Hugging Face model folder)")
    try:
        kind = json.loads(path.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    return GLMConfig.load(path) if kind == "glm_jax" else GLMConfig.from_hf(path)


def run_config(c: NeedleConfig, haystack: Haystack) -> dict:
    """What the results depend on (config.json): a rerun with the same resumes."""
    return {"model": str(pathlib.Path(c.model).resolve()),
            "haystack": haystack.description if haystack.name == FILLER_NAME else haystack.name,
            "haystack_sha256": haystack.sha256, "haystack_tokens": haystack.tokens,
            "repeat_haystack": haystack.repeat, "lengths": [int(n) for n in c.lengths],
            "depths": [float(d) for d in c.depths], "samples": c.samples, "seed": c.seed,
            "multi_needle": c.multi_needle, "instruction": c.instruction, "max_new_tokens": c.max_new_tokens,
            "dtype": c.dtype, "kv_cache_dtype": c.kv_cache_dtype, "needle": NEEDLE, "question": QUESTION}


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def run(c: NeedleConfig) -> dict:
    """The whole test: checks every input before writing anything, then runs the missing prompts of
    the grid (one prefill and a greedy decode each), appending a result line as each finishes, and
    writes summary.json and heatmap.png. Returns the summary."""
    from glm_jax.tokenizer import Tokenizer

    c.check()
    out = pathlib.Path(c.out)
    config = model_config(c.model)
    longest = max(c.lengths)
    if longest + c.max_new_tokens > config.max_seq_len:
        raise ValueError(f"context length {longest:,} + --max-new-tokens {c.max_new_tokens} is above the "
                         f"model's context ({config.max_seq_len:,} tokens)")
    tokenizer = Tokenizer.from_file(c.model)
    haystack = load_haystack(c.haystack, tokenizer, c.repeat_haystack)
    cases = plan_cases(tokenizer, haystack, c.lengths, c.depths, c.samples, c.multi_needle, c.seed, c.instruction)
    settings = run_config(c, haystack)
    check_out(out, settings, c.force)
    done = set() if c.force else {result_key(r) for r in read_results(out / RESULTS)}
    total = len(cases) * c.multi_needle
    todo = [(case, j) for case in cases for j in range(c.multi_needle)
            if (case.context_length, case.depth_percent, case.sample, j) not in done]
    _log(f"needle: {c.model}; haystack: {haystack.description}; {len(c.lengths)} lengths x {len(c.depths)} depths"
         f" x {c.samples} samples" + (f" x {c.multi_needle} needles" if c.multi_needle > 1 else "") +
         f" = {total} prompts, {total - len(todo)} done; results in {out / RESULTS}", c.progress)
    model = None
    if todo:   # the weights (and the mesh) load before OUT is written to
        import glm_jax

        model = glm_jax.load(c.model, dtype=c.dtype, mesh=c.mesh, prefill_chunk=c.prefill_chunk,
                             kv_cache_dtype=c.kv_cache_dtype)
    rows = start_out(out, settings, c.force)
    try:
        if todo:
            _run_prompts(c, model, out, haystack, tokenizer, todo, rows, total)
    finally:
        summary = write_summary(out, rows, settings)
    return summary


def _run_prompts(c: NeedleConfig, model, out: pathlib.Path, haystack: Haystack, tokenizer, todo, rows: list,
                 total: int):
    vocab = tokenizer.vocab_size
    for case, j in todo:
        needle = case.needles[j]
        question = needle.question(c.instruction)
        prompt = build_prompt(tokenizer, haystack, case.context_length, case.needles, question, case.offset)
        first: list[float] = []
        start = time.perf_counter()
        ids = model.generate([prompt.ids], max_new_tokens=c.max_new_tokens, temperature=0,
                             on_token=lambda row, token: first or first.append(time.perf_counter()),
                             progress=c.progress and len(prompt.ids) >= PREFILL_BAR_TOKENS)[0]
        seconds = time.perf_counter() - start
        response = tokenizer.decode([t for t in ids if t < vocab], skip_special_tokens=True)
        ttft = (first[0] if first else time.perf_counter()) - start
        row = {"context_length": case.context_length, "depth_percent": case.depth_percent, "sample": case.sample,
               "needle": j, "needles": len(case.needles), "needle_depth_percent": needle.depth,
               "city": needle.city, "question": question, "answer": needle.answer, "response": response,
               "correct": is_correct(needle.answer, response), "prompt_tokens": len(prompt.ids),
               "needle_token_index": prompt.needle_token_indices[j],
               "needle_token_indices": list(prompt.needle_token_indices),
               "haystack": haystack.name, "haystack_offset": case.offset,
               "haystack_sentences": prompt.haystack_sentences, "new_tokens": len(ids),
               "prefill_tokens_per_s": len(prompt.ids) / ttft if ttft > 0 else None, "seconds": seconds}
        append_result(out / RESULTS, row)
        rows.append(row)
        speed = row["prefill_tokens_per_s"]
        _log(f"needle {len(rows)}/{total} | length {case.context_length:,} depth {case.depth_percent:g}% "
             f"sample {case.sample}" + (f" needle {j + 1}/{len(case.needles)}" if len(case.needles) > 1 else "") +
             f" | {len(prompt.ids):,} tokens, prefill {speed or 0:,.0f} tok/s, {seconds:.1f} s | "
             f"{'correct' if row['correct'] else 'wrong'}", c.progress)
