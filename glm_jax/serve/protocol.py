"""The OpenAI-compatible request and response bodies (chat completions, completions, models, errors).

Requests are validated here (types and ranges); what needs the model (prompt length, the model
name) is checked in `glm_jax.serve.app`. Fields that OpenAI clients may send but that glm-jax does
not implement (presence_penalty, logprobs, user, ...) are ignored; `n` must be 1.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

INT64 = {"ge": -(2**63), "le": 2**63 - 1}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors ----------------------------------------------------------------------------------

class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(_Response):
    """What every failed request gets: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


# ---- shared request parts ----------------------------------------------------------------------

class StreamOptions(_Request):
    include_usage: bool = False


class FunctionDefinition(_Request):
    name: Annotated[str, Field(min_length=1, pattern=r"^\S+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """Calls this tool: only it is offered to the model (generation itself is not constrained)."""

    type: Literal["function"]
    function: NamedFunction


class _Sampling(_Request):
    """The sampling fields both endpoints share. Those left out take the model folder's
    generation_config.json defaults (as `glm-jax generate` does); max_tokens defaults to what
    is left of max_model_len after the prompt."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: Annotated[int, Field(**INT64)] | None = None
    num_speculative_tokens: Annotated[int, Field(ge=0)] | None = None    # an extra field: drafts a step, 0 = off
    stop: Annotated[str | list[str] | None, Field(validate_default=True)] = None   # a list once validated
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


# ---- chat completions --------------------------------------------------------------------------

class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """A conversation turn. `developer` counts as `system`; `tool` becomes GLM-4's `observation`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | NamedToolChoice | None = None


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class PromptTokensDetails(_Response):
    cached_tokens: int


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class _Sparse(_Response):
    """A streamed delta: only the fields it sets are sent."""

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunction(_Sparse):
    """A streamed piece of a call: the name once, in the call's first chunk; the arguments in pieces."""

    name: str | None = None
    arguments: str


class DeltaToolCall(_Sparse):
    """The first chunk of a call carries its id, type and name; later ones the index and more arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatDelta(_Sparse):
    """What a chunk adds to the message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- completions -------------------------------------------------------------------------------

class CompletionRequest(_Sampling):
    """`prompt`: text (encoded with the `[gMASK]<sop>` prefix, as `model.generate` does) or token ids
    (used as they are)."""

    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(_Response):
    """The whole answer, or (streaming) one chunk of it: then `usage` is null but in the last one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- models ------------------------------------------------------------------------------------

class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm-jax"
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
