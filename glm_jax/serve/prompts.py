"""OpenAI chat requests -> GLM-4 prompt ids.

OpenAI messages map onto GLM-4's chat format by `glm_jax.openai_messages` (tools, tool calls,
`tool` and `developer` roles), as fine-tuning data does.

The prompt is rendered by `glm_jax.chat` unless the model folder's tokenizer_config.json carries a
`chat_template` that renders a sample conversation differently: that template is then rendered
as transformers does (Jinja in a sandbox, trim_blocks, lstrip_blocks, `tojson` without ASCII
escapes, `raise_exception`) with the GLM-4 messages and `add_generation_prompt=True`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glm_jax import openai_messages
from glm_jax.serve.protocol import ChatMessage, Tool
from glm_jax.tokenizer import TOKENIZER_CONFIG, Tokenizer

# Every feature of the format: tools, system, a tool call, an observation, an answer, a new turn.
SAMPLE_CONVERSATION = (
    {"role": "system", "content": "", "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "当前天气", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]},
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "北京天气如何？"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
    {"role": "observation", "content": '{"temperature": 20}'},
    {"role": "assistant", "content": "北京现在 20 度。"},
    {"role": "user", "content": "Thanks!"},
)


def glm_messages(messages: Sequence[ChatMessage], tools: Sequence[Tool] | None) -> list[dict[str, Any]]:
    """OpenAI messages (and the tools offered, if any) -> GLM-4 messages for `glm_jax.chat.render`."""
    return openai_messages.glm_messages([m.model_dump() for m in messages],
                                        [t.model_dump(exclude_none=True) for t in tools or ()])


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: plain json.dumps, non-ASCII kept, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def compile_template(source: str) -> jinja2.Template:
    """A chat template, compiled with the environment transformers renders templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


class ChatPrompt:
    """Renders GLM-4 messages as prompt ids, by `glm_jax.chat` or by the folder's own template.

    The built-in renderer encodes message content as plain text (special-token strings in user
    input stay text); a folder template's output is encoded whole, as transformers does.
    """

    def __init__(self, tokenizer: Tokenizer, template_source: str | None = None) -> None:
        self._tokenizer = tokenizer
        self.template: jinja2.Template | None = None
        if template_source is not None:
            template = compile_template(template_source)
            builtin = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False)
            try:
                same = template.render(messages=SAMPLE_CONVERSATION, add_generation_prompt=True) == builtin
            except jinja2.TemplateError:
                same = False
            self.template = None if same else template

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path | None, tokenizer: Tokenizer) -> ChatPrompt:
        """The renderer for a model folder: its tokenizer_config.json's `chat_template`, if any, decides."""
        path = None if folder is None else pathlib.Path(folder) / TOKENIZER_CONFIG
        if path is None or not path.is_file():
            return cls(tokenizer)
        try:
            source = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not a readable JSON object ({e})") from None
        if source is not None and not isinstance(source, str):
            raise ValueError(f"{path}: chat_template must be a string (named templates are not supported)")
        return cls(tokenizer, source)

    def ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """GLM-4 messages -> prompt ids ending in the generation prompt. Raises ValueError for
        messages the format cannot render (jinja2.TemplateError from a folder template)."""
        if self.template is None:
            return self._tokenizer.apply_chat_template(messages, split_special_tokens=True)
        return self._tokenizer.encode(self.template.render(messages=messages, add_generation_prompt=True))
