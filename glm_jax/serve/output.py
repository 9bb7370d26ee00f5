"""Generated ids -> the text a client sees, piece by piece, so that streaming equals non-streaming.

`StopText` decodes (special tokens skipped) and cuts the text before the first stop string.
`ChatText` turns that text into an assistant message: content stripped as `glm_jax.chat.parse_response`
strips it, or a tool call when the first line names an offered tool and the rest starts a JSON object.
Both are fed the same way whether the response streams or not.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Collection, Iterable, Sequence

from glm_jax.serve.protocol import FunctionCall, ResponseToolCall
from glm_jax.tokenizer import Tokenizer


class StopText:
    """Decoded text cut before the first stop string.

    The last len(longest stop) - 1 characters are held back until more text shows they do not
    begin a stop string, so no piece ever contains text that a later stop would have removed.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._stops = list(stops)
        self._hold = max(map(len, self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False   # a stop string was found: the text is complete

    def push(self, ids: Iterable[int]) -> str:
        """New ids -> the text now known to precede any stop string (possibly "")."""
        return self._scan(self._decoder.push(ids), final=False)

    def finish(self) -> str:
        """The held-back rest, once generation has ended."""
        return self._scan(self._decoder.flush(), final=True)

    def _scan(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._pending + text
        found = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if found:
            self.stopped, self._pending = True, ""
            return text[:min(found)]
        keep = 0 if final else min(self._hold, len(text))
        self._pending = text[len(text) - keep:]
        return text[:len(text) - keep]


@dataclasses.dataclass(frozen=True)
class Piece:
    """What one push adds: content, or the start of a tool call (`call`, with its first
    arguments) or more of its arguments."""

    content: str = ""
    call: ResponseToolCall | None = None
    arguments: str = ""


class ChatText:
    """Assistant text -> content pieces as they come, or a tool call as it comes.

    With tools offered, text is held until its first line is complete and the next non-blank
    character is known: a first line naming an offered tool followed by `{` is a call
    (`{name}\\n{json arguments}`, GLM-4's format), whose arguments then stream as the model writes
    them, exactly as written (the message renders back to the same prompt; a response cut by
    max_tokens leaves partial JSON, as OpenAI's do); anything else is content, streamed with leading
    and trailing whitespace removed, as `glm_jax.chat.parse_response` strips it.
    """

    def __init__(self, tool_names: Collection[str] = ()) -> None:
        self._tool_names = set(tool_names)
        self._mode = "undecided" if self._tool_names else "content"   # | "call"
        self._buffer = ""
        self._started = False   # content past its leading whitespace has been returned
        self._held = ""         # trailing whitespace of the content so far
        self._name, self._id, self._arguments = "", "", []

    @property
    def call(self) -> ResponseToolCall | None:
        """The whole tool call so far, if the text is one."""
        if self._mode != "call":
            return None
        return ResponseToolCall(id=self._id, function=FunctionCall(name=self._name, arguments="".join(self._arguments)))

    def push(self, text: str) -> Piece:
        """Decoded text -> what to send now (possibly nothing)."""
        if self._mode == "content":
            return Piece(content=self._content(text))
        if self._mode == "call":
            self._arguments.append(text)
            return Piece(arguments=text)
        self._buffer += text
        first_line, newline, rest = self._buffer.partition("\n")
        if not newline:
            return Piece()                                  # the first line is not complete yet
        named = first_line.strip() in self._tool_names
        if named and not rest.strip():
            return Piece()                                  # a call or not: the next character says
        if named and rest.lstrip().startswith("{"):
            self._mode, self._name, self._id = "call", first_line.strip(), f"call_{uuid.uuid4().hex[:24]}"
            self._arguments.append(rest)
            return Piece(call=self.call, arguments=rest)
        self._mode, text, self._buffer = "content", self._buffer, ""
        return Piece(content=self._content(text))

    def finish(self) -> Piece:
        """The rest, once generation has ended."""
        if self._mode == "undecided":
            self._mode, text, self._buffer = "content", self._buffer, ""
            return Piece(content=self._content(text))
        return Piece()

    def _content(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        return body
