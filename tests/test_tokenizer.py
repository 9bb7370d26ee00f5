"""Tokenizer: golden ids of the original, round trips, streaming decode, a tiny vocab, bad input."""

from __future__ import annotations

import base64
import json
import pathlib

import numpy as np
import pytest
from conftest import glm4_tokenizer, golden_cases
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_jax.tokenizer import SPECIAL_TOKENS, Tokenizer

GLM4_SPECIAL_IDS = dict(zip(SPECIAL_TOKENS, range(151329, 151343)))


@pytest.fixture(scope="session")
def tok(reference: pathlib.Path) -> Tokenizer:
    return glm4_tokenizer()


# ---------------------------------------------------------------------------------------------
# The real vocabulary against the original tokenizer's outputs.


def test_golden_text_cases(tok: Tokenizer) -> None:
    cases = golden_cases("text")
    assert len(cases) == 64
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.encode(case["text"], add_special_tokens=True) == case["ids_with_prefix"], case["text"]
        assert tok.decode(case["ids"]) == case["decoded"] == case["text"]
        # The original's slow decode adds spaces around special tokens; ours is exact.
        if "hf_slow_decoded" in case:
            assert tok.decode(case["ids"]) != case["hf_slow_decoded"]


def test_golden_text_cases_batched(tok: Tokenizer) -> None:
    cases = golden_cases("text")
    texts = [case["text"] for case in cases]
    assert tok.encode_batch(texts) == [case["ids"] for case in cases]
    assert tok.encode_batch(texts, add_special_tokens=True) == [case["ids_with_prefix"] for case in cases]
    assert tok.encode_batch(texts, split_special_tokens=True) == [
        tok.encode(t, split_special_tokens=True) for t in texts
    ]


def test_vocabulary_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 151343
    assert tok.special_tokens == GLM4_SPECIAL_IDS
    assert tok.prefix_ids == [151331, 151333]
    assert tok.eos_id == 151329
    assert tok.assistant_name == "GLM-4"


def test_special_token_strings_parsed_unless_split(tok: Tokenizer) -> None:
    for name, token_id in GLM4_SPECIAL_IDS.items():
        assert tok.encode(name) == [token_id]
        plain = tok.encode(name, split_special_tokens=True)
        assert all(i < 151329 for i in plain) and tok.decode(plain) == name
    text = "x<|user|>y[gMASK]"
    assert tok.encode(text) == tok.encode("x") + [151336] + tok.encode("y") + [151331]


def test_decode_skip_special_tokens_and_arrays(tok: Tokenizer) -> None:
    ids = tok.encode("<|user|>\n你好<|assistant|>", add_special_tokens=True)
    assert tok.decode(ids) == "[gMASK]<sop><|user|>\n你好<|assistant|>"
    assert tok.decode(ids, skip_special_tokens=True) == "\n你好"
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == tok.decode(ids)
    assert tok.decode([]) == ""


# ---------------------------------------------------------------------------------------------
# Properties on arbitrary text. Surrogates are excluded: they are not encodable text (tiktoken
# replaces a lone surrogate with U+FFFD).

SPECIAL_STRINGS = st.sampled_from(SPECIAL_TOKENS)
PIECES = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=8),  # CJK
    st.text(st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF), max_size=3),  # CJK ext. B
    st.sampled_from(["😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "\u200d", "\ufffd", "é", "e\u0301"]),
    st.text(st.sampled_from(" \t\n\r\u3000\xa0"), max_size=6),  # whitespace runs
    SPECIAL_STRINGS,
    st.sampled_from(["<|", "|>", "<|user", "[gMASK", "<so", "p>"]),  # fragments of special strings
)
TEXTS = st.lists(PIECES, max_size=10).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, split=st.booleans())
def test_roundtrip(tok: Tokenizer, text: str, split: bool) -> None:
    ids = tok.encode(text, split_special_tokens=split)
    assert tok.decode(ids) == text
    if split:
        assert all(i < 151329 for i in ids)


def _stream(tok: Tokenizer, ids: list[int], chunk: int) -> list[str]:
    decoder = tok.stream_decoder()
    pieces = [decoder.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [decoder.flush()]


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, chunk=st.integers(1, 4))
def test_stream_decoder_emits_whole_characters(tok: Tokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids, chunk)
    assert "".join(pieces) == tok.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 151342), max_size=20))
def test_stream_decoder_matches_decode_on_any_ids(tok: Tokenizer, ids: list[int]) -> None:
    # Arbitrary ids make invalid UTF-8: the stream still ends up equal to the one-shot decode.
    assert "".join(_stream(tok, ids, 1)) == tok.decode(ids)


def test_stream_decoder_holds_back_a_split_character(tok: Tokenizer) -> None:
    ids = tok.encode("龘𪚥")  # byte-level pieces: 2 tokens, then 4
    assert len(ids) == 6
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "龘", "", "", "", "𪚥"]
    assert decoder.flush() == ""
    decoder = tok.stream_decoder()
    assert decoder.push(ids[:3]) == "龘" and decoder.flush() == "\ufffd"  # an unfinished character


def test_padding_ids_have_no_text(tok: Tokenizer) -> None:
    # The model's embedding has 151,552 rows, past the 151,343 ids of the tokenizer: a sampled
    # padding id is dropped with the special tokens, and refused when they are kept.
    ids = tok.encode("Hi 你好")
    padded = [151343, *ids[:2], 151551, *ids[2:], 151400]
    assert tok.decode(padded, skip_special_tokens=True) == "Hi 你好"
    decoder = tok.stream_decoder(skip_special_tokens=True)
    assert "".join(decoder.push(i) for i in padded) + decoder.flush() == "Hi 你好"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode(padded)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1, *ids], skip_special_tokens=True)


def test_stream_decoder_skip_special_tokens(tok: Tokenizer) -> None:
    decoder = tok.stream_decoder(skip_special_tokens=True)
    assert decoder.push(tok.encode("Hi<|user|>")) == "Hi"
    assert decoder.push(151329) == "" and decoder.push(np.int64(9703)) == "Hello"


# ---------------------------------------------------------------------------------------------
# Mechanics on a tiny vocabulary: 256 bytes plus a few merges.

TINY_MERGES = [b" a", b"ab", b"abab", b"\xe4\xbd", b"\xe4\xbd\xa0"]  # ranks 256..260; last: "你"


def write_vocab(folder: pathlib.Path, tokens: list[bytes]) -> pathlib.Path:
    path = folder / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    tokens = [bytes([b]) for b in range(256)] + TINY_MERGES
    return Tokenizer.from_file(write_vocab(tmp_path_factory.mktemp("tiny"), tokens))


def test_tiny_vocab(tiny: Tokenizer) -> None:
    n = 256 + len(TINY_MERGES)
    assert tiny.vocab_size == n + 14
    assert tiny.special_tokens["<|endoftext|>"] == n and tiny.special_tokens["<|end_of_video|>"] == n + 13
    assert tiny.encode("abab") == [258]
    assert tiny.encode("ab ab") == [257, 256, ord("b")]  # " a" outranks "ab"
    assert tiny.encode("你") == [260]
    assert tiny.encode("x", add_special_tokens=True) == [n + 2, n + 4, ord("x")]
    assert tiny.encode("<|user|>") == [n + 7]
    assert tiny.encode("<|user|>", split_special_tokens=True) == list(b"<|user|>")
    assert tiny.decode([260, n + 8, 257]) == "你<|assistant|>ab"
    assert tiny.decode([260, n + 8, 257], skip_special_tokens=True) == "你ab"
    decoder = tiny.stream_decoder()
    assert [decoder.push(i) for i in [0xE5, 0xA5, 0xBD, 258]] == ["", "", "好", "abab"]


@settings(max_examples=50, deadline=None)
@given(text=TEXTS, split=st.booleans())
def test_tiny_vocab_roundtrip(tiny: Tokenizer, text: str, split: bool) -> None:
    assert tiny.decode(tiny.encode(text, split_special_tokens=split)) == text


def test_folder_with_configs(tmp_path: pathlib.Path) -> None:
    write_vocab(tmp_path, [bytes([b]) for b in range(256)])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% if tools %}你是一个名为 TinyGLM 的人工智能助手。{% endif %}"})
    )
    for path in (tmp_path, tmp_path / "tokenizer.model"):  # the folder, or the file inside it
        tiny = Tokenizer.from_file(path)
        assert tiny.assistant_name == "TinyGLM"


def test_unrecognised_chat_template_warns(tmp_path: pathlib.Path) -> None:
    write_vocab(tmp_path, [bytes([b]) for b in range(256)])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    with pytest.warns(UserWarning, match="not a published GLM-4 template"):
        assert Tokenizer.from_file(tmp_path).assistant_name == "GLM-4"


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_missing_vocabulary(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer vocabulary not found"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer vocabulary not found"):
        Tokenizer.from_file(tmp_path / "nope.model")


BYTES = [bytes([b]) for b in range(256)]
B64 = [base64.b64encode(t).decode() for t in BYTES]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty vocabulary"),
        ([f"{t} {r}" for r, t in enumerate(B64)] + ["!!notbase64!! 256"], r"tokenizer.model:257: expected"),
        ([f"{t} {r}" for r, t in enumerate(B64)] + ["YWI="], r"tokenizer.model:257: expected"),
        ([f"{t} {r}" for r, t in enumerate(B64)] + ["YWI= x"], r"tokenizer.model:257: expected"),
        ([f"{t} {r}" for r, t in enumerate(B64)] + ["YWI= 256 9"], r"tokenizer.model:257: expected"),
        ([f"{t} {r}" for r, t in enumerate(B64)] + [f"{B64[0]} 256"], "listed twice"),
        ([f"{t} {r}" for r, t in enumerate(B64)] + ["YWI= 300"], r"ranks are not exactly 0..256"),
        ([f"{t} {r}" for r, t in enumerate(B64[:200])], "56 single bytes have no token"),
    ],
)
def test_corrupt_vocabulary(tmp_path: pathlib.Path, lines: list[str], message: str) -> None:
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_file(tmp_path)


def test_corrupt_configs(tmp_path: pathlib.Path) -> None:
    write_vocab(tmp_path, BYTES)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not a readable JSON file"):
        Tokenizer.from_file(tmp_path)


@pytest.mark.parametrize("bad", [151343, -1, 10**12])
def test_decode_rejects_ids_outside_vocabulary(tok: Tokenizer, bad: int) -> None:
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary \\(0..151342\\)"):
        tok.decode([9703, bad])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.stream_decoder().push(bad)
