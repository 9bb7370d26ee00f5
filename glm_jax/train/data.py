"""Fine-tuning data: a JSONL file -> examples (ids and labels) -> fixed-shape batches.

One example a line, in one of three forms:

    {"messages": [...]}                      a conversation, as `glm_jax.chat.render` takes it (tools
                                             and metadata included), or in OpenAI's format (top-level
                                             "tools", assistant "tool_calls", role "tool"; converted by
                                             `glm_jax.openai_messages`); loss on the assistant turns
    {"text": "..."}                          a document; loss on every token
    {"input_ids": [...], "labels": [...]}    pre-tokenized; without "labels" every token counts

Labels are aligned with the ids as in transformers: labels[i] is the token at i where it counts and
IGNORE (-100) where it does not. The loss shifts them (position i predicts labels[i + 1]), so
labels[0] never counts; it is stored as IGNORE.

A conversation is encoded as `apply_chat_template(..., add_generation_prompt=False,
split_special_tokens=True)` encodes it (role markers special, content ordinary text), plus
`<|endoftext|>` when it ends with an assistant turn. Each assistant turn counts from after its
`<|assistant|>` marker (metadata, "\\n", content) through the token that ends it: the next rendered
token (the next role marker, e.g. `<|user|>` or `<|observation|>`) or that appended `<|endoftext|>`,
so the model learns where to stop. A document is `[gMASK]<sop>`, its text, `<|endoftext|>`; all but
the two prefix tokens count.

`Batches` lays the examples out in [batch, seq_len] rows, one a row or packed, epoch after epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from glm_jax.openai_messages import glm_messages
from glm_jax.tokenizer import Tokenizer

IGNORE = -100  # a label that does not count (transformers' ignore_index)

# The fields each form of example may have; the first one names the form.
FORMS = {"messages": ("messages", "tools"), "text": ("text",), "input_ids": ("input_ids", "labels")}
_FORMS_HELP = '{"messages": [...]}, {"text": "..."} or {"input_ids": [...], "labels": [...]}'

_INT32_LIMIT = 2**31  # pre-tokenized ids must fit int32 when no vocab_size bounds them


class DataError(ValueError):
    """Bad training data: `{path}:{line}: {problem}` (1-based line), or `{path}: {problem}` for the
    whole file."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One training example; labels aligned with the ids (labels[0] is always IGNORE)."""

    input_ids: np.ndarray  # [L] int32
    labels: np.ndarray  # [L] int32, IGNORE where not counted
    line: int  # its 1-based line in the JSONL file


def read_examples(
    path: str | os.PathLike,
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    truncate: bool = False,
    vocab_size: int | None = None,
) -> list[Example]:
    """Reads a JSONL file of examples (see the module docstring), skipping blank lines.

    An example longer than `seq_len` tokens is an error, or cut to its first `seq_len` tokens with
    `truncate`. Without a tokenizer only pre-tokenized examples can be read. Pre-tokenized ids (and
    labels other than IGNORE) must lie in 0..vocab_size-1 when `vocab_size` is given. Raises DataError naming the first bad line and its problem.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}")
    examples = []
    try:
        with open(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    ids, labels = _encode(_record(raw), tokenizer, vocab_size)
                    examples.append(_fit(ids, labels, line, seq_len, truncate))
                except ValueError as e:
                    raise DataError(f"{path}:{line}: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _record(raw: bytes) -> dict[str, Any]:
    """One line -> its JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.pos + 1})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _form(record: dict[str, Any]) -> str:
    """The form of an example (a key of FORMS); ValueError for a mix of forms or an unknown field."""
    forms = [key for key in FORMS if key in record]
    if len(forms) > 1:
        raise ValueError(f"fields {' and '.join(map(repr, forms))} mix two forms; expected one of {_FORMS_HELP}")
    if not forms:
        fields = ", ".join(map(repr, record)) or "none"
        raise ValueError(f"expected one of {_FORMS_HELP}; got fields {fields}")
    unknown = [key for key in record if key not in FORMS[forms[0]]]
    if unknown:
        allowed = " and ".join(map(repr, FORMS[forms[0]]))
        raise ValueError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"a {forms[0]!r} example has only {allowed}"
        )
    return forms[0]


def _encode(record: dict[str, Any], tokenizer: Tokenizer, vocab_size: int | None) -> tuple[list[int], list[int]]:
    """An example's JSON object -> (ids, labels), at full length."""
    form = _form(record)
    if form != "input_ids" and tokenizer is None:
        raise ValueError(f"a {form!r} example needs the model's tokenizer (no tokenizer.model in the model folder)")
    if form == "messages":
        return _conversation(record["messages"], tokenizer, record.get("tools"))
    if form == "text":
        return _document(record["text"], tokenizer)
    return _pretokenized(record["input_ids"], record.get("labels", record["input_ids"]), vocab_size)


def _conversation(messages: Any, tokenizer: Tokenizer, tools: Any = None) -> tuple[list[int], list[int]]:
    """A conversation -> (ids, labels); assistant turns and their end tokens count (module docstring)."""
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    ids = tokenizer.apply_chat_template(glm_messages(messages, tools), add_generation_prompt=False,
                                        split_special_tokens=True)
    special = set(tokenizer.special_tokens.values())   # content is encoded as ordinary text: never these
    assistant = tokenizer.special_tokens["<|assistant|>"]
    counted: list[bool] = []
    turn_open = False  # inside an assistant's content: it and the token that ends it count
    for i, token in enumerate(ids):
        if token in special:
            counted.append(turn_open)
            turn_open = False
        else:  # the template starts with [gMASK]<sop>, so a text run always follows a special token
            if ids[i - 1] in special:
                turn_open = ids[i - 1] == assistant
            counted.append(turn_open)
    if turn_open:
        ids.append(tokenizer.eos_id)
        counted.append(True)
    if not any(counted):
        raise ValueError("no assistant message with content: nothing to learn from")
    return ids, [i if c else IGNORE for i, c in zip(ids, counted)]


def _document(text: Any, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """A document -> (ids, labels): `[gMASK]<sop>` text `<|endoftext|>`, all but the prefix counted."""
    if not isinstance(text, str) or not text:
        raise ValueError("'text' must be a non-empty string")
    body = tokenizer.encode(text, split_special_tokens=True) + [tokenizer.eos_id]
    prefix = list(tokenizer.prefix_ids)
    return prefix + body, [IGNORE] * len(prefix) + body


def _pretokenized(input_ids: Any, labels: Any, vocab_size: int | None) -> tuple[list[int], list[int]]:
    """Checked pre-tokenized ids and labels."""
    limit = _INT32_LIMIT if vocab_size is None else vocab_size
    _check_ints("input_ids", input_ids, lambda x: 0 <= x < limit, f"an id in 0..{limit - 1}")
    if not input_ids:
        raise ValueError("'input_ids' is empty")
    _check_ints("labels", labels, lambda x: x == IGNORE or 0 <= x < limit, f"{IGNORE} or an id in 0..{limit - 1}")
    if len(labels) != len(input_ids):
        raise ValueError(f"'labels' has {len(labels)} entries but 'input_ids' has {len(input_ids)}")
    return input_ids, labels


def _check_ints(field: str, values: Any, ok: Callable[[int], bool], expected: str) -> None:
    """ValueError unless `values` is a list of ints (not bools) that are all `ok`."""
    if not isinstance(values, list):
        raise ValueError(f"{field!r} must be a list of integers, got {type(values).__name__}")
    for position, value in enumerate(values):
        if type(value) is not int or not ok(value):
            raise ValueError(f"{field!r}[{position}] is {json.dumps(value)}; expected {expected}")


def _fit(ids: list[int], labels: list[int], line: int, seq_len: int, truncate: bool) -> Example:
    """(ids, labels) -> an Example of at most `seq_len` tokens with something to learn from."""
    cut = len(ids) > seq_len
    if cut and not truncate:
        raise ValueError(f"{len(ids)} tokens, longer than --seq-len {seq_len} (use --truncate to cut long examples)")
    label_array = np.array(labels[:seq_len], np.int32)  # [L]
    label_array[0] = IGNORE  # no position predicts the first token
    if (label_array == IGNORE).all():
        raise ValueError(
            f"no label counts in the first {seq_len} tokens kept by --truncate"
            if cut
            else "no label counts (all are -100 but the first, which never counts)"
        )
    return Example(np.array(ids[:seq_len], np.int32), label_array, line)


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """One step's input: `batch_size` rows of `seq_len` tokens, each row one or more examples
    followed by padding."""

    tokens: np.ndarray  # [B, L] int32; pad_id at padding
    labels: np.ndarray  # [B, L] int32, aligned; IGNORE at padding and at each example's first token
    positions: np.ndarray  # [B, L] int32; 0, 1, ... within each example; 0 at padding
    segment_ids: np.ndarray  # [B, L] int32; 1, 2, ... for the examples of a row; 0 at padding


class Batches:
    """Examples -> a Batch per `next()`, forever; deterministic and resumable.

    Epoch e takes every example once, in an order shuffled by a numpy Generator seeded with
    (seed, e), or in the given order with shuffle=False. Rows take the examples in that order: one
    a row, or with `packing` greedily as many as fit (the next example joins the current row if it
    fits, else starts the next row), each with its own segment id and positions from 0.

    Epoch boundary: an epoch ends with a batch of its own. Rows its last batch lacks are fully
    padded (segment id 0, no label counts) and the next epoch starts a new batch, so a batch never
    mixes two epochs. `state()` between batches is the epoch and the index in its order of the next
    example; `restore(state)` makes the following batches those an uninterrupted run would give.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        packing: bool = False,
    ) -> None:
        if not examples:
            raise ValueError("no examples to batch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for example in examples:
            if not 1 <= len(example.input_ids) <= seq_len or len(example.labels) != len(example.input_ids):
                raise ValueError(
                    f"example of line {example.line}: {len(example.input_ids)} ids and {len(example.labels)} "
                    f"labels; expected as many of each, 1 to seq_len {seq_len}"
                )
        self._examples = list(examples)
        self._lengths = [len(example.input_ids) for example in self._examples]
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.seed, self.shuffle, self.packing = seed, shuffle, packing
        self._start_epoch(0)

    def state(self) -> dict[str, int]:
        """Where the batcher is: {"epoch": e, "index": i} (the next example is order(e)[i])."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, int]) -> None:
        """Continues from a `state()`: the next batches are those that followed it."""
        if set(state) != {"epoch", "index"} or not all(type(v) is int for v in state.values()):
            raise ValueError(f"expected a state {{'epoch': int, 'index': int}}, got {state!r}")
        if state["epoch"] < 0 or not 0 <= state["index"] < len(self._examples):
            raise ValueError(f"state {state!r} is out of range for {len(self._examples)} examples")
        self._start_epoch(state["epoch"], state["index"])

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Batch:
        rows, end = self._rows(self._order, self._index, self.batch_size)
        batch = self._assemble(rows)
        if end == len(self._order):
            self._start_epoch(self._epoch + 1)
        else:
            self._index = end
        return batch

    def _start_epoch(self, epoch: int, index: int = 0) -> None:
        self._epoch, self._index, self._order = epoch, index, self._order_of(epoch)

    def _order_of(self, epoch: int) -> np.ndarray:
        """The epoch's order of the examples: [N] indices."""
        if not self.shuffle:
            return np.arange(len(self._examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._examples))

    def _rows(self, order: np.ndarray, start: int, limit: int) -> tuple[list[list[int]], int]:
        """Up to `limit` rows from order[start:] -> (each row's example indices, where the next row
        would start in `order`)."""
        rows: list[list[int]] = []
        i = start
        while len(rows) < limit and i < len(order):
            row, used = [], 0
            while i < len(order):
                length = self._lengths[order[i]]
                if row and (not self.packing or used + length > self.seq_len):
                    break
                row.append(int(order[i]))
                used += length
                i += 1
            rows.append(row)
        return rows, i

    def _assemble(self, rows: list[list[int]]) -> Batch:
        """Rows of example indices -> a Batch; missing rows are fully padded."""
        shape = (self.batch_size, self.seq_len)
        tokens = np.full(shape, self.pad_id, np.int32)
        labels = np.full(shape, IGNORE, np.int32)
        positions = np.zeros(shape, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        for r, row in enumerate(rows):
            start = 0
            for segment, k in enumerate(row, 1):
                example = self._examples[k]
                span = slice(start, start + len(example.input_ids))
                tokens[r, span] = example.input_ids
                labels[r, span] = example.labels
                labels[r, start] = IGNORE  # else predicted from the previous example's last token
                positions[r, span] = np.arange(span.stop - span.start)
                segment_ids[r, span] = segment
                start = span.stop
        return Batch(tokens, labels, positions, segment_ids)
