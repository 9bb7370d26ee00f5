"""OpenAI chat messages -> GLM-4 messages (what `glm_jax.chat.render` takes): one conversion for the
server's chat requests and for fine-tuning data.

The offered `tools` become a first system message carrying them (GLM-4's tool prompt); an assistant
message's `tool_calls` become assistant messages with the tool name as `metadata` and the arguments
as content (what the model emits for a call), after one with its text, if any; `tool` messages
become `observation` ones, `developer` ones `system`. Content may be a string, null or a list of
text parts. GLM-4 messages (`metadata`, `tools`, role `observation`) pass through unchanged, so a
conversation may be in either format. Plain Python: no JAX, no server dependencies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = {"developer": "system", "tool": "observation"}
GLM_FIELDS = ("metadata", "tools")


def glm_messages(messages: Sequence[Any], tools: Sequence[Any] | None = None) -> list[Any]:
    """OpenAI messages (and the tools offered, if any) -> GLM-4 messages. Raises ValueError naming the
    message at fault; what is not a dict is left for `chat.render` to refuse."""
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ValueError(f"'tools' must be a list, got {type(tools).__name__}")
    glm: list[Any] = [{"role": "system", "content": "", "tools": list(tools)}] if tools else []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            glm.append(message)
            continue
        converted = {"role": ROLES.get(message.get("role"), message.get("role"))}
        if "content" in message:
            converted["content"] = _text(i, message["content"])
        converted.update((key, message[key]) for key in GLM_FIELDS if key in message)
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            if not isinstance(calls, (list, tuple)):
                raise ValueError(f"message {i}: 'tool_calls' must be a list, got {type(calls).__name__}")
            if converted.get("content"):
                glm.append(converted)
            glm += [_call(i, call) for call in calls]
        else:
            glm.append(converted)
    return glm


def _text(index: int, content: Any) -> Any:
    """A message's content as one string: null is empty, text parts are joined; other values pass."""
    if content is None:
        return ""
    if isinstance(content, list):
        if not all(isinstance(part, Mapping) and isinstance(part.get("text"), str) for part in content):
            raise ValueError(f"message {index}: content parts must be {{'type': 'text', 'text': str}}")
        return "".join(part["text"] for part in content)
    return content


def _call(index: int, call: Any) -> dict[str, str]:
    """One OpenAI tool call -> the GLM-4 assistant message that makes it."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"message {index}: a tool call needs 'function': {{'name': str, 'arguments': str}}")
    arguments = function.get("arguments", "")
    if isinstance(arguments, Mapping):          # an object instead of its JSON text
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise ValueError(f"message {index}: a tool call's 'arguments' must be a JSON string")
    return {"role": "assistant", "metadata": function["name"], "content": arguments}
