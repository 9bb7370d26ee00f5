"""Fine-tuning data: the three JSONL forms, the loss masks, bad input, truncation, batching, resume."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
from conftest import glm4_tokenizer

from glm_jax.tokenizer import Tokenizer
from glm_jax.train.data import IGNORE, Batch, Batches, DataError, Example, read_examples

USER, ASSISTANT, EOS = 151336, 151337, 151329
PREFIX = [151331, 151333]  # [gMASK]<sop>

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]
TOOL_CALL = [
    {"role": "system", "content": "", "tools": [WEATHER_TOOL]},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
    {"role": "observation", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
    {"role": "user", "content": "Thanks"},
]
# name -> (messages, the decoded runs of counted tokens: assistant contents and what ends each turn)
CONVERSATIONS = {
    "two turns": (TWO_TURNS, ["\nHello!<|user|>", "\nGoodbye.<|endoftext|>"]),
    "tool call": (TOOL_CALL, ['get_weather\n{"city": "Paris"}<|observation|>', "\nIt is 21 °C in Paris.<|user|>"]),
    "special strings in content": (
        [
            {"role": "user", "content": "What does <|user|> mean?"},
            {"role": "assistant", "content": "It starts a turn: <|user|>\n and <|endoftext|> ends text."},
        ],
        ["\nIt starts a turn: <|user|>\n and <|endoftext|> ends text.<|endoftext|>"],
    ),
    "tools on a user message, empty assistant turn": (
        [
            {"role": "user", "content": "  spaced\n\n", "tools": [{"type": "python"}, WEATHER_TOOL]},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "metadata": "python", "content": "print(1)"},
            {"role": "observation", "content": "1"},
        ],
        ["python\nprint(1)<|observation|>"],
    ),
    "assistant then assistant": (
        [
            {"role": "user", "content": "Sum 2 and 3, then say hi"},
            {"role": "assistant", "content": "5"},
            {"role": "assistant", "content": "hi"},
        ],
        ["\n5<|assistant|>\nhi<|endoftext|>"],
    ),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return glm4_tokenizer()


def write_lines(tmp_path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_records(tmp_path: pathlib.Path, tok: Tokenizer, *records: object, **kwargs) -> list[Example]:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    return read_examples(write_lines(tmp_path, lines), tok, **{"seq_len": 4096, **kwargs})


def counted_spans(tok: Tokenizer, example: Example) -> list[str]:
    """The decoded runs of consecutive counted tokens (their labels must be the tokens themselves)."""
    spans, run = [], []
    for token, label in zip(example.input_ids.tolist(), example.labels.tolist()):
        if label == IGNORE:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            assert label == token
            run.append(token)
    return spans + ([tok.decode(run)] if run else [])


# ---------------------------------------------------------------------------------------------
# The three forms.


def test_text_form(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    text = "A document <|user|> with a special-token string."
    (example,) = read_records(tmp_path, tok, {"text": text})
    body = tok.encode(text, split_special_tokens=True)
    assert example.input_ids.dtype == example.labels.dtype == np.int32
    assert example.input_ids.tolist() == PREFIX + body + [EOS]
    assert example.labels.tolist() == [IGNORE, IGNORE] + body + [EOS]
    assert USER not in example.input_ids  # the string stays text
    assert counted_spans(tok, example) == [text + "<|endoftext|>"]
    assert example.line == 1


def test_pretokenized_form(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    given, every = read_records(
        tmp_path, tok, {"input_ids": [5, 6, 7, 8], "labels": [5, -100, 7, 8]}, {"input_ids": [9, 10, 11]}
    )
    assert given.input_ids.tolist() == [5, 6, 7, 8]
    assert given.labels.tolist() == [IGNORE, IGNORE, 7, 8]  # the first label never counts
    assert every.input_ids.tolist() == [9, 10, 11]
    assert every.labels.tolist() == [IGNORE, 10, 11]
    assert (given.line, every.line) == (1, 2)


def test_line_numbers_count_blank_lines(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    path = write_lines(tmp_path, ["", '{"text": "a"}', "   ", "", '{"input_ids": [1, 2]}', ""])
    assert [e.line for e in read_examples(path, tok, seq_len=16)] == [2, 5]


# ---------------------------------------------------------------------------------------------
# Conversations: encoding and the assistant loss mask.


def test_two_turn_conversation_counts_assistant_turns_and_their_ends(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    (example,) = read_records(tmp_path, tok, {"messages": TWO_TURNS})
    assert counted_spans(tok, example) == ["\nHello!<|user|>", "\nGoodbye.<|endoftext|>"]
    ids = example.input_ids.tolist()
    assert ids == tok.apply_chat_template(TWO_TURNS, add_generation_prompt=False, split_special_tokens=True) + [EOS]
    # The counted end tokens are the special ids, right after each assistant's content.
    counted = [i for i, label in enumerate(example.labels.tolist()) if label != IGNORE]
    assert [ids[i] for i in counted].count(USER) == 1 and ids[counted[-1]] == EOS
    assert ids[counted[0] - 1] == ASSISTANT  # counting starts right after the marker


def test_tool_call_conversation(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    (example,) = read_records(tmp_path, tok, {"messages": TOOL_CALL})
    # The tool prompt, the user and observation turns do not count; the call (metadata and
    # arguments) and the answer do, each through the marker that ends it. No <|endoftext|>: the
    # conversation ends with a user message.
    assert counted_spans(tok, example) == CONVERSATIONS["tool call"][1]
    assert example.input_ids.tolist() == tok.apply_chat_template(
        TOOL_CALL, add_generation_prompt=False, split_special_tokens=True
    )
    assert "# 可用工具" in tok.decode(example.input_ids) and EOS not in example.input_ids


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_conversation_encoding_and_mask(tmp_path: pathlib.Path, tok: Tokenizer, name: str) -> None:
    messages, spans = CONVERSATIONS[name]
    (example,) = read_records(tmp_path, tok, {"messages": messages})
    whole = tok.apply_chat_template(messages, add_generation_prompt=False, split_special_tokens=True)
    per_message = list(PREFIX)
    for message in messages:
        per_message += tok.apply_chat_template([message], add_generation_prompt=False, split_special_tokens=True)[2:]
    assert whole == per_message
    ends_with_assistant = messages[-1]["role"] == "assistant"
    assert example.input_ids.tolist() == whole + [EOS] * ends_with_assistant
    assert counted_spans(tok, example) == spans


def test_special_strings_in_content_stay_text(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    messages, _ = CONVERSATIONS["special strings in content"]
    (example,) = read_records(tmp_path, tok, {"messages": messages})
    ids = example.input_ids.tolist()
    assert ids.count(USER) == 1 and ids.count(EOS) == 1  # the real markers only


# ---------------------------------------------------------------------------------------------
# OpenAI's format: the same tokens and loss mask as GLM-4's own, the published template's text.


def _call(name: str, arguments: object) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


OPENAI = {
    "tool call": (
        {"tools": [WEATHER_TOOL], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", '{"city": "Paris"}')]},
            {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": [{"type": "text", "text": "It is 21 °C in Paris."}]},
            {"role": "user", "content": "Thanks"},
        ]},
        TOOL_CALL,
        CONVERSATIONS["tool call"][1],
    ),
    "text and two calls, developer": (
        {"tools": [WEATHER_TOOL], "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [
                _call("get_weather", '{"city": "Paris"}'), _call("get_weather", {"city": "Rome"})]},
            {"role": "tool", "content": "21"},
            {"role": "tool", "content": "25"},
            {"role": "assistant", "content": "21 and 25."},
        ]},
        [
            {"role": "system", "content": "", "tools": [WEATHER_TOOL]},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": "Checking both."},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Rome"}'},
            {"role": "observation", "content": "21"},
            {"role": "observation", "content": "25"},
            {"role": "assistant", "content": "21 and 25."},
        ],
        ['\nChecking both.<|assistant|>get_weather\n{"city": "Paris"}<|assistant|>get_weather\n{"city": "Rome"}'
         "<|observation|>", "\n21 and 25.<|endoftext|>"],
    ),
}


@pytest.mark.parametrize("name", OPENAI)
def test_openai_format_equals_glm_format(tmp_path: pathlib.Path, tok: Tokenizer, name: str) -> None:
    from test_chat import published_template

    openai, glm, spans = OPENAI[name]
    a, b = read_records(tmp_path, tok, openai, {"messages": glm})
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
    rendered = published_template("glm-4-9b-chat-1m").render(messages=glm, add_generation_prompt=False)
    eos = [EOS] if glm[-1]["role"] == "assistant" else []
    assert a.input_ids.tolist() == tok.encode(rendered) + eos
    assert counted_spans(tok, a) == spans


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the line and the problem.

GOOD = '{"text": "fine"}'
BAD_LINES = {
    "malformed JSON": (
        '{"text": "a",}',
        r"not valid JSON \(Expecting property name enclosed in double quotes at column 14\)",
    ),
    "truncated JSON": ('{"text": "a"', r"not valid JSON \(Expecting ',' delimiter at column 14\)"),
    "not an object": ('["text", "a"]', r"expected a JSON object, got list"),
    "unknown field": (
        '{"text": "a", "source": "web"}',
        r"unknown field 'source'; a 'text' example has only 'text'",
    ),
    "unknown fields": (
        '{"input_ids": [1, 2], "mask": [1, 1], "tools": []}',
        r"unknown fields 'mask', 'tools'; a 'input_ids' example has only 'input_ids' and 'labels'",
    ),
    "unknown field beside messages": (
        '{"messages": [{"role": "assistant", "content": "a"}], "functions": []}',
        r"unknown field 'functions'; a 'messages' example has only 'messages' and 'tools'",
    ),
    "tools not a list": (
        '{"messages": [{"role": "assistant", "content": "a"}], "tools": {}}',
        r"'tools' must be a list, got dict",
    ),
    "tool call without a name": (
        '{"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}',
        r"message 0: a tool call needs 'function': \{'name': str, 'arguments': str\}",
    ),
    "two forms": (
        '{"text": "a", "messages": []}',
        r"fields 'messages' and 'text' mix two forms; expected one of \{\"messages\": \[\.\.\.\]\}, "
        r"\{\"text\": \"\.\.\.\"\} or \{\"input_ids\": \[\.\.\.\], \"labels\": \[\.\.\.\]\}",
    ),
    "no form": ('{"labels": [1, 2]}', r"expected one of \{\"messages\".*\]\}; got fields 'labels'"),
    "empty object": ("{}", r"expected one of \{\"messages\".*\]\}; got fields none"),
    "messages not a list": ('{"messages": "hi"}', r"'messages' must be a list, got str"),
    "bad role": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        r"message 1: unknown role 'bot'; expected one of system, user, assistant, observation",
    ),
    "non-string content": (
        '{"messages": [{"role": "assistant", "content": 3}]}',
        r"message 0: 'content' and 'metadata' must be strings",
    ),
    "no assistant turn": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
        r"no assistant message with content: nothing to learn from",
    ),
    "empty text": ('{"text": ""}', r"'text' must be a non-empty string"),
    "text not a string": ('{"text": ["a"]}', r"'text' must be a non-empty string"),
    "ids not a list": ('{"input_ids": "1 2 3"}', r"'input_ids' must be a list of integers, got str"),
    "ids empty": ('{"input_ids": []}', r"'input_ids' is empty"),
    "float id": ('{"input_ids": [1, 2.0]}', r"'input_ids'\[1\] is 2\.0; expected an id in 0\.\.151342"),
    "bool id": ('{"input_ids": [1, true]}', r"'input_ids'\[1\] is true; expected an id in 0\.\.151342"),
    "id out of vocabulary": (
        '{"input_ids": [1, 151343]}',
        r"'input_ids'\[1\] is 151343; expected an id in 0\.\.151342",
    ),
    "negative id": ('{"input_ids": [-100, 1]}', r"'input_ids'\[0\] is -100; expected an id in 0\.\.151342"),
    "bad label": (
        '{"input_ids": [1, 2], "labels": [-100, -1]}',
        r"'labels'\[1\] is -1; expected -100 or an id in 0\.\.151342",
    ),
    "null labels": ('{"input_ids": [1, 2], "labels": null}', r"'labels' must be a list of integers, got NoneType"),
    "label count": ('{"input_ids": [1, 2], "labels": [1, 2, 3]}', r"'labels' has 3 entries but 'input_ids' has 2"),
    "nothing counts": (
        '{"input_ids": [1, 2], "labels": [1, -100]}',
        r"no label counts \(all are -100 but the first, which never counts\)",
    ),
    "too long": (
        '{"input_ids": [' + ", ".join(["7"] * 17) + "]}",
        r"17 tokens, longer than --seq-len 16 \(use --truncate to cut long examples\)",
    ),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_line_names_line_and_problem(tmp_path: pathlib.Path, tok: Tokenizer, name: str) -> None:
    bad, problem = BAD_LINES[name]
    path = write_lines(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as error:
        read_examples(path, tok, seq_len=16, vocab_size=tok.vocab_size)
    assert re.fullmatch(re.escape(f"{path}:3: ") + problem, str(error.value)), str(error.value)
    assert "\n" not in str(error.value)


def test_bad_utf8_line(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: not UTF-8 text$"):
        read_examples(path, tok, seq_len=16)


def test_without_vocab_size_ids_need_only_fit_int32(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    (example,) = read_records(tmp_path, tok, {"input_ids": [1, 2**31 - 1]}, seq_len=16)
    assert example.input_ids.tolist() == [1, 2**31 - 1]
    with pytest.raises(DataError, match=r":1: 'input_ids'\[0\] is 2147483648; expected an id in 0\.\.2147483647$"):
        read_records(tmp_path, tok, {"input_ids": [2**31, 1]}, seq_len=16)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read (No such file or directory)"), ("", "no examples"), ("\n  \n\n", "no examples")],
)
def test_whole_file_problems(tmp_path: pathlib.Path, tok: Tokenizer, content: str | None, problem: str) -> None:
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as error:
        read_examples(path, tok, seq_len=16)
    assert str(error.value) == f"{path}: {problem}"


# ---------------------------------------------------------------------------------------------
# Truncation.


def test_truncate_keeps_the_first_tokens(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    records = [{"text": " ".join(map(str, range(100, 125)))}, {"messages": TWO_TURNS}]
    full = read_records(tmp_path, tok, *records, seq_len=4096)
    assert [len(e.input_ids) for e in full] == [2 + 1 + 24 * 2 + 1, 25]  # "100", then " " "101" ..., "<|endoftext|>"
    with pytest.raises(DataError, match=r":1: 52 tokens, longer than --seq-len 20 \(use --truncate"):
        read_records(tmp_path, tok, *records, seq_len=20)
    cut = read_records(tmp_path, tok, *records, seq_len=20, truncate=True)
    for short, long in zip(cut, full):
        assert short.input_ids.tolist() == long.input_ids[:20].tolist()
        assert short.labels.tolist() == long.labels[:20].tolist()
    assert counted_spans(tok, cut[1]) == ["\nHello!<|user|>"]  # the second turn was cut off


def test_truncation_that_leaves_nothing_to_learn_is_an_error(tmp_path: pathlib.Path, tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "ok"}]
    path = write_lines(tmp_path, [GOOD, json.dumps({"messages": messages})])
    with pytest.raises(DataError) as error:
        read_examples(path, tok, seq_len=12, truncate=True)
    assert str(error.value) == f"{path}:2: no label counts in the first 12 tokens kept by --truncate"


# ---------------------------------------------------------------------------------------------
# Batching.


def example(length: int, line: int) -> Example:
    """Ids line*100 + 1, 2, ...; every label counts, the first included (Batches must mask it)."""
    ids = np.arange(1, length + 1, dtype=np.int32) + 100 * line
    return Example(ids, ids.copy(), line)


def row(*lengths_and_lines: tuple[int, int], seq_len: int, pad_id: int = 0) -> dict[str, list[int]]:
    """The expected row holding these examples, then padding."""
    tokens, labels, positions, segments = [], [], [], []
    for segment, (length, line) in enumerate(lengths_and_lines, 1):
        ids = (np.arange(1, length + 1) + 100 * line).tolist()
        tokens += ids
        labels += [IGNORE] + ids[1:]
        positions += list(range(length))
        segments += [segment] * length
    pad = seq_len - len(tokens)
    return {
        "tokens": tokens + [pad_id] * pad,
        "labels": labels + [IGNORE] * pad,
        "positions": positions + [0] * pad,
        "segment_ids": segments + [0] * pad,
    }


def rows_of(batch: Batch) -> list[dict[str, list[int]]]:
    fields = ("tokens", "labels", "positions", "segment_ids")
    assert all(getattr(batch, f).dtype == np.int32 for f in fields)
    return [{f: getattr(batch, f)[r].tolist() for f in fields} for r in range(batch.tokens.shape[0])]


def test_batches_without_packing() -> None:
    examples = [example(3, 1), example(6, 2), example(2, 3)]
    batches = Batches(examples, batch_size=2, seq_len=6, pad_id=9, shuffle=False)
    first, second = next(batches), next(batches)
    assert first.tokens.shape == (2, 6)
    assert rows_of(first) == [row((3, 1), seq_len=6, pad_id=9), row((6, 2), seq_len=6, pad_id=9)]
    # The epoch's last batch is completed with a fully padded row; the next epoch starts anew.
    assert rows_of(second) == [row((2, 3), seq_len=6, pad_id=9), row(seq_len=6, pad_id=9)]
    assert batches.state() == {"epoch": 1, "index": 0}
    third = next(batches)
    assert rows_of(third) == rows_of(first)


def test_batches_with_packing() -> None:
    # Lengths 3 4 | 2 5 1 | 6 in seq_len 8: the next example joins the row while it fits.
    examples = [example(n, line) for line, n in enumerate([3, 4, 2, 5, 1, 6], 1)]
    batches = Batches(examples, batch_size=2, seq_len=8, pad_id=0, shuffle=False, packing=True)
    first, second = next(batches), next(batches)
    assert rows_of(first) == [row((3, 1), (4, 2), seq_len=8), row((2, 3), (5, 4), (1, 5), seq_len=8)]
    assert first.segment_ids[1].tolist() == [1, 1, 2, 2, 2, 2, 2, 3]
    assert first.positions[1].tolist() == [0, 1, 0, 1, 2, 3, 4, 0]
    assert first.labels[0].tolist() == [IGNORE, 102, 103, IGNORE, 202, 203, 204, IGNORE]
    assert rows_of(second) == [row((6, 6), seq_len=8), row(seq_len=8)]
    assert batches.state() == {"epoch": 1, "index": 0}


def test_batches_reject_examples_longer_than_seq_len() -> None:
    expected = r"example of line 2: 9 ids and 9 labels; expected as many of each, 1 to seq_len 8"
    with pytest.raises(ValueError, match=expected):
        Batches([example(8, 1), example(9, 2)], batch_size=1, seq_len=8, pad_id=0)


def epoch_orders(batches: Batches, epochs: int, n: int = 20) -> list[list[int]]:
    """The lines of the n examples each epoch yields (batch_size 1, no packing: one example a batch)."""
    return [[int(next(batches).tokens[0, 0]) // 100 for _ in range(n)] for _ in range(epochs)]


def test_shuffle_is_deterministic_by_seed_and_epoch() -> None:
    examples = [example(2, line) for line in range(1, 21)]
    make = lambda **kw: Batches(examples, batch_size=1, seq_len=4, pad_id=0, **kw)  # noqa: E731
    seed0 = epoch_orders(make(seed=0), 3)
    assert seed0 == epoch_orders(make(seed=0), 3)
    assert all(sorted(order) == list(range(1, 21)) for order in seed0)
    assert seed0[0] != seed0[1] != seed0[2]  # each epoch has its own order
    assert seed0[0] != list(range(1, 21))
    assert epoch_orders(make(seed=1), 1)[0] != seed0[0]
    assert epoch_orders(make(seed=5, shuffle=False), 2) == [list(range(1, 21))] * 2


@pytest.mark.parametrize("packing", [False, True])
def test_restore_gives_the_batches_an_uninterrupted_run_gives(packing: bool) -> None:
    examples = [example(n, line) for line, n in enumerate([5, 2, 7, 3, 3, 9, 1], 1)]
    make = lambda: Batches(examples, batch_size=2, seq_len=10, pad_id=0, seed=3, packing=packing)  # noqa: E731
    run = make()
    states, batches = [], []
    for _ in range(14):
        states.append(run.state())
        batches.append(rows_of(next(run)))
    assert all(type(v) is int for s in states for v in s.values())
    boundaries = [s for s in states if s["index"] == 0 and s["epoch"] > 0]
    assert len(boundaries) >= 2 and any(s["index"] > 0 for s in states)
    assert states[-1]["epoch"] >= 2
    for k, state in enumerate(states):
        resumed = make()
        resumed.restore(json.loads(json.dumps(state)))
        assert [rows_of(next(resumed)) for _ in range(min(4, len(batches) - k))] == batches[k : k + 4]
    # Each epoch's batches hold every example once (ids are line * 100 + 1, 2, ...).
    for epoch in (0, 1):
        starts = [t for s, b in zip(states, batches) if s["epoch"] == epoch for r in b for t in r["tokens"]
                  if t % 100 == 1]
        assert sorted(t // 100 for t in starts) == list(range(1, 8)), epoch


def test_restore_rejects_a_bad_state() -> None:
    batches = Batches([example(2, 1), example(2, 2)], batch_size=1, seq_len=4, pad_id=0)
    for state in ({"epoch": 0}, {"epoch": 0, "index": 2}, {"epoch": -1, "index": 0}, {"epoch": 0, "index": 1.0}):
        with pytest.raises(ValueError):
            batches.restore(state)
