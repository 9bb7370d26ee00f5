"""The GLM-4 chat format in plain Python: prompt rendering and response parsing.

`render` reproduces the published Jinja chat template as transformers renders it (trim_blocks,
lstrip_blocks, `tojson` = `json.dumps(ensure_ascii=False)`):

    [gMASK]<sop>
    for each message:
        if it has "tools": <|system|> + tool prompt (names the assistant, lists each tool)
        if its content is non-empty: <|{role}|>{metadata}\\n{content}
    <|assistant|>                      (the generation prompt)

There is no end-of-turn token: generation stops on `<|endoftext|>`, `<|user|>` or `<|observation|>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant", "observation")

# glm-4-9b-chat-1m's template says "GLM-4"; glm-4-9b-chat's says "ChatGLM".
DEFAULT_ASSISTANT_NAME = "GLM-4"

_TOOL_PROMPT_HEAD = (
    "\n你是一个名为 {name} 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
_FUNCTION_PROMPT = "\n## {name}\n\n{spec}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
_BUILTIN_TOOL_PROMPTS = {
    "python": (
        "\n## python\n\n"
        "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
        "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
        "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。"
        "不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
    ),
    "simple_browser": (
        "\n## simple_browser\n\n"
        "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
        "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，"
        "可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
        "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。"
        "选择多个角度的页面，同时尽可能选择可信任的信息来源。"
        "考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
        "`open_url(url: str)`：打开指定的 URL。\n\n"
        "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
        "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
        "3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
        " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
        "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
    ),
    "cogview": (
        "\n## cogview\n\n"
        "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
        "你需要向 `cogview` 发送图像描述，规则：\n"
        "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
        "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
        "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
        "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
    ),
}


class Segment(NamedTuple):
    """A piece of a rendered prompt: a special token (by its string) or ordinary text."""

    text: str
    special: bool


def _tool_prompt(index: int, tools: Any, assistant_name: str) -> str:
    """The text after `<|system|>` that a message with `tools` emits."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"message {index}: 'tools' must be a list, got {type(tools).__name__}")
    parts = [_TOOL_PROMPT_HEAD.format(name=assistant_name)]
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind == "function":
            function = tool.get("function")
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise ValueError(f"message {index}: a function tool needs 'function': {{'name': str, ...}}")
            spec = json.dumps(function, ensure_ascii=False, indent=4)
            parts.append(_FUNCTION_PROMPT.format(name=function["name"], spec=spec))
        elif kind in _BUILTIN_TOOL_PROMPTS:
            parts.append(_BUILTIN_TOOL_PROMPTS[kind])
        else:
            raise ValueError(
                f"message {index}: unknown tool type {kind!r}; "
                "expected function, python, simple_browser or cogview"
            )
    return "".join(parts)


def render(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    assistant_name: str = DEFAULT_ASSISTANT_NAME,
) -> list[Segment]:
    """Renders a conversation as segments; `"".join(s.text for s in segments)` is the template's output.

    Each message is a dict with `role` (system, user, assistant, observation) and `content` (str;
    an empty one emits nothing), optionally `metadata` (str; the tool name of an assistant's call)
    and `tools` (list of {"type": "function", "function": {...}} or {"type": "python" |
    "simple_browser" | "cogview"}; `content` may then be left out). Raises ValueError otherwise.
    """
    segments = [Segment("[gMASK]", True), Segment("<sop>", True)]
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in message and "tools" not in message:
            raise ValueError(f"message {i}: {role} message has no 'content'")
        content, metadata = message.get("content", ""), message.get("metadata", "")
        # The template would print str(value) (None as "None"): only strings are accepted instead.
        if not isinstance(content, str) or not isinstance(metadata, str):
            raise ValueError(f"message {i}: 'content' and 'metadata' must be strings")
        if "tools" in message:
            tool_prompt = _tool_prompt(i, message["tools"], assistant_name)
            segments += [Segment("<|system|>", True), Segment(tool_prompt, False)]
        if content:
            segments += [Segment(f"<|{role}|>", True), Segment(f"{metadata}\n{content}", False)]
    if add_generation_prompt:
        segments.append(Segment("<|assistant|>", True))
    return segments


_TOOL_NAME = re.compile(r"\S+")


def parse_response(text: str) -> dict[str, Any]:
    """Decoded assistant output (what followed `<|assistant|>`, stop token excluded) -> a message.

    GLM-4 answers `\\n{content}`, or calls a tool as `{name}\\n{json arguments}`:

      plain:     {"role": "assistant", "content": content.strip()}
      tool call: {"role": "assistant", "metadata": name, "content": json_text,
                  "tool_call": {"name": name, "arguments": dict}}

    A tool-call message can be appended to the conversation as is: `metadata` and `content` render
    back to exactly what the model emitted. A first line that is not a single word, or a rest that
    is not a JSON object (e.g. code for the `python` tool), leaves the whole text as plain content.
    """
    first_line, newline, rest = text.partition("\n")
    name = first_line.strip()
    if newline and _TOOL_NAME.fullmatch(name):
        try:
            arguments = json.loads(rest)
        except ValueError:
            arguments = None
        if isinstance(arguments, dict):
            return {
                "role": "assistant",
                "metadata": name,
                "content": rest,
                "tool_call": {"name": name, "arguments": arguments},
            }
    return {"role": "assistant", "content": text.strip()}
