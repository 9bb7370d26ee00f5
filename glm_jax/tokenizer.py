"""The GLM-4 tokenizer: tiktoken BPE over the published `tokenizer.model`, plus 14 special tokens.

Ids 0..N-1 are the BPE ranks of `tokenizer.model` (N = 151,329 for GLM-4); the special tokens
follow as N..N+13 (151,329..151,342), in the order of `SPECIAL_TOKENS`. Special-token strings that
appear in text are parsed as those tokens, like the original tokenizer does, unless
`split_special_tokens=True`. Encoding runs inside tiktoken (no Python loop per token).
"""

from __future__ import annotations

import base64
import codecs
import itertools
import json
import numbers
import pathlib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tiktoken

from glm_jax import chat

# The pre-tokenizer split pattern of GLM-4 (the same as cl100k_base).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip

# What `encode(..., add_special_tokens=True)` and every chat prompt start with.
PREFIX_TOKENS = ("[gMASK]", "<sop>")

VOCAB_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"

# In the published chat templates the only difference between models is this name in the tool prompt.
_ASSISTANT_NAME = re.compile(r"你是一个名为 (.+?) 的人工智能助手")


def _load_ranks(path: pathlib.Path) -> dict[bytes, int]:
    """Reads `tokenizer.model`: one `<base64 token bytes> <rank>` per line, ranks 0..N-1."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:  # blank line
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except ValueError:  # binascii.Error is a ValueError
                raise ValueError(
                    f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}"
                ) from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} is listed twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty vocabulary")
    if set(ranks.values()) != set(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} single bytes have no token (first: {missing[0]:#04x})")
    return ranks


def _assistant_name(config_path: pathlib.Path) -> str:
    """The assistant's name in the tool prompt of a published chat template; the 1M model's by default."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable JSON file ({e})") from None
    template = config.get("chat_template")
    if template is None:  # base model: no template published
        return chat.DEFAULT_ASSISTANT_NAME
    found = _ASSISTANT_NAME.search(str(template))
    if found is None:
        warnings.warn(
            f"{config_path}: chat_template is not a published GLM-4 template; glm-jax renders the "
            f"GLM-4-9B-Chat-1M format instead",
            stacklevel=3,
        )
        return chat.DEFAULT_ASSISTANT_NAME
    return found.group(1)


class Tokenizer:
    """GLM-4 tokenizer: encode/decode, streaming decode and the chat format.

    Attributes:
      vocab_size: number of ids this tokenizer produces or decodes (BPE ranks + 14 special tokens;
        151,343 for GLM-4; the model's embedding is padded further to 151,552). Note that the
        original's `vocab_size` counts only the BPE ranks.
      special_tokens: special-token string -> id.
      assistant_name: the name the tool prompt gives the assistant ("GLM-4" for the 1M model,
        "ChatGLM" for the 128K one).
    """

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        *,
        assistant_name: str = chat.DEFAULT_ASSISTANT_NAME,
    ) -> None:
        n = len(ranks)
        self.special_tokens: dict[str, int] = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            "glm4", pat_str=SPLIT_PATTERN, mergeable_ranks=dict(ranks), special_tokens=self.special_tokens
        )
        self._num_ranks = n
        self.vocab_size: int = self._encoding.n_vocab
        self.prefix_ids: list[int] = [self.special_tokens[t] for t in PREFIX_TOKENS]
        self.assistant_name = assistant_name

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> Tokenizer:
        """Loads `tokenizer.model` from a file path or the folder holding it.

        `tokenizer_config.json` in the same folder (its chat template names the assistant) is used
        when present.
        """
        path = pathlib.Path(path)
        vocab = path / VOCAB_FILE if path.is_dir() else path
        if not vocab.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab}")
        folder = vocab.parent
        config = folder / TOKENIZER_CONFIG
        return cls(
            _load_ranks(vocab),
            assistant_name=_assistant_name(config) if config.is_file() else chat.DEFAULT_ASSISTANT_NAME,
        )

    @property
    def eos_id(self) -> int:
        """Id of `<|endoftext|>`."""
        return self.special_tokens["<|endoftext|>"]

    def encode(
        self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False
    ) -> list[int]:
        """Text -> ids.

        Special-token strings in `text` become their special ids unless `split_special_tokens`, which
        encodes them as ordinary text. `add_special_tokens` prepends `[gMASK]<sop>`.
        """
        if split_special_tokens:
            ids = self._encoding.encode_ordinary(text)
        else:
            ids = self._encoding.encode(text, allowed_special="all")
        return self.prefix_ids + ids if add_special_tokens else ids

    def encode_batch(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = False,
        split_special_tokens: bool = False,
        num_threads: int = 8,
    ) -> list[list[int]]:
        """`encode` over many texts, in parallel threads inside tiktoken."""
        texts = list(texts)
        if split_special_tokens:
            batch = self._encoding.encode_ordinary_batch(texts, num_threads=num_threads)
        else:
            batch = self._encoding.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return [self.prefix_ids + ids for ids in batch] if add_special_tokens else batch

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Ids -> the raw bytes they stand for (possibly ending inside a UTF-8 character).

        `skip_special_tokens` drops every id without text: the special tokens and the ids past the
        vocabulary (the model's embedding is padded further, and a model may sample such an id).
        Otherwise an id outside the vocabulary is a ValueError.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy/jax arrays too
        if skip_special_tokens:
            ids = [i for i in ids if i < self._num_ranks]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._encoding.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text, exactly: `decode(encode(text)) == text` (invalid UTF-8 shows as U+FFFD)."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for generated ids arriving one (or a few) at a time."""
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        split_special_tokens: bool = False,
    ) -> list[int] | str:
        """The prompt for `messages` in the GLM-4 chat format (`glm_jax.chat.render`), as ids
        (`tokenize=True`) or as a string.

        With `split_special_tokens=False` the string is tokenized whole, as the original does, so
        special-token strings inside message content become special tokens. With True, only the
        template's own role markers are special; content is encoded as ordinary text, so user input
        cannot forge a turn.
        """
        segments = chat.render(messages, add_generation_prompt, self.assistant_name)
        text = "".join(s.text for s in segments)
        if not tokenize:
            return text
        if not split_special_tokens:
            return self.encode(text)
        ids: list[int] = []
        # Runs of text between two special tokens are encoded together, as whole-string encoding does.
        for special, run in itertools.groupby(segments, key=lambda s: s.special):
            if special:
                ids += [self.special_tokens[s.text] for s in run]
            else:
                ids += self.encode("".join(s.text for s in run), split_special_tokens=True)
        return ids

    def parse_response(self, text: str) -> dict[str, Any]:
        """Decoded assistant output -> a message; see `glm_jax.chat.parse_response`."""
        return chat.parse_response(text)


class StreamDecoder:
    """Turns ids into text as they arrive, emitting only complete UTF-8 characters.

    A character whose bytes span several tokens is held back until its last byte arrives, so no
    U+FFFD appears mid-stream; `"".join(pushes) + flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Iterable[int]) -> str:
        """Adds one id or several; returns the newly completed text (possibly "")."""
        ids = [int(ids)] if isinstance(ids, numbers.Integral) else ids
        return self._utf8.decode(self._tokenizer.decode_bytes(ids, self._skip_special_tokens))

    def flush(self) -> str:
        """Ends the stream: returns held-back bytes of an unfinished character (as U+FFFD), if any."""
        return self._utf8.decode(b"", final=True)
