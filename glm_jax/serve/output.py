"""Generated ids -> the text a client sees, piece by piece, so that streaming equals non-streaming.

`StopText` decodes (special tokens skipped) and cuts the text before the first stop string.
`ChatText` turns that text into an assistant message: content stripped as `glm_jax.chat.parse_response`
strips it, or a tool call when the first line names an offered tool and the rest is a JSON object.
Both are fed the same way whether the response streams or not.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from glm_jax import chat
from glm_jax.serve.protocol import FunctionCall, ResponseToolCall
from glm_jax.tokenizer import Tokenizer


class StopText:
    """Decoded text cut before the first stop string.

    The last len(longest stop) - 1 characters are held back until more text shows they do not
    begin a stop string, so no piece ever contains text that a later stop would have removed.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._vocab_size = tokenizer.vocab_size
        self._stops = list(stops)
        self._hold = max(map(len, self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False   # a stop string was found: the text is complete

    def push(self, ids: Iterable[int]) -> str:
        """New ids -> the text now known to precede any stop string (possibly "")."""
        # The embedding is padded past the tokenizer's ids; such an id has no text.
        return self._scan(self._decoder.push([i for i in ids if i < self._vocab_size]), final=False)

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


class ChatText:
    """Assistant text -> content pieces as they come, or one tool call at the end.

    With tools offered, text is held until its first line is complete: a first line naming an
    offered tool starts a possible call (`{name}\\n{json arguments}`), buffered to the end and then
    parsed by `glm_jax.chat.parse_response`; anything else is content. Content is streamed with
    leading and trailing whitespace removed, as parse_response strips it.
    """

    def __init__(self, tool_names: Collection[str] = ()) -> None:
        self._tool_names = set(tool_names)
        self._mode = "undecided" if self._tool_names else "content"   # | "call"
        self._buffer = ""
        self._started = False   # content past its leading whitespace has been returned
        self._held = ""         # trailing whitespace of the content so far

    def push(self, text: str) -> str:
        """Decoded text -> the content to send now (possibly "")."""
        if self._mode == "content":
            return self._content(text)
        self._buffer += text
        if self._mode == "undecided":
            first_line, newline, _ = self._buffer.partition("\n")
            if not newline:
                return ""
            if first_line.strip() in self._tool_names:
                self._mode = "call"
                return ""
            self._mode, text, self._buffer = "content", self._buffer, ""
            return self._content(text)
        return ""

    def finish(self) -> tuple[str, ResponseToolCall | None]:
        """(the rest of the content, the tool call if the text was one)."""
        if self._mode == "content":
            return "", None
        parsed: dict[str, Any] = chat.parse_response(self._buffer)
        if "tool_call" in parsed and parsed["metadata"] in self._tool_names:
            # The arguments as the model wrote them: sent back in a later request, they render the same.
            call = FunctionCall(name=parsed["metadata"], arguments=parsed["content"])
            return "", ResponseToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=call)
        return self._content(self._buffer), None

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
