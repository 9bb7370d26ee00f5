"""The OpenAI-compatible HTTP server over the decode engine: `create_app(model, engine, ...)`.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics.
Each completion request is one `engine.submit`; the engine thread hands its token batches to the
event loop (`loop.call_soon_threadsafe` into an asyncio.Queue), where they are decoded, cut at
stop strings and sent whole or as server-sent events. A client that goes away cancels its request,
so its batch slot frees at the next engine step. Every failure answers with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`: 400 bad input, 404 unknown model or route, 429
queue full. The caller owns the engine: it starts it before serving and shuts it down after.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from glm_jax.engine import Engine, EngineClosed, QueueFull, SamplingParams
from glm_jax.serve.metrics import Metrics
from glm_jax.serve.output import ChatText, Piece, StopText
from glm_jax.serve.prompts import ChatPrompt, glm_messages
from glm_jax.serve.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatDelta, Completion, CompletionChoice, CompletionRequest, DeltaFunction, DeltaToolCall, ErrorBody, ErrorDetail,
    ModelCard, ModelList, PromptTokensDetails, ResponseToolCall, Tool, Usage,
)

logger = logging.getLogger("glm_jax.serve")

ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")
DISCONNECT_POLL_S = 0.5     # how often a non-streaming request checks that its client is still there
_ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 429, 503)}
ABORTED = "the request was aborted before it finished (the server is shutting down)"


class APIError(Exception):
    """A request that fails with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorBody(error=self.detail).model_dump(), status_code=self.status)


def _param(loc: list[Any]) -> str | None:
    """A validation error's location -> the field it names, e.g. "messages[0].role". Pydantic's
    own entries (union members such as "str" or "list[int]", model names) are left out."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.isidentifier() and item.islower() and item not in ("str", "int", "float", "bool", "none"):
            parts.append(f".{item}" if parts else item)
    return "".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first of the deepest errors: of a union's members, the one validation got furthest into."""
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    loc = list(error["loc"])[1:] if error["loc"][:1] == ("body",) else list(error["loc"])
    if error["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}")
    param = _param(loc)
    return APIError(400, f"{param}: {error['msg']}" if param else f"request body: {error['msg']}", param=param)


class _AccessLog:
    """ASGI middleware: after a response's last byte (a stream's included), one log line (method,
    path, status, prompt and completion tokens, seconds) and the request counted by endpoint and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, state = time.perf_counter(), 500, scope.setdefault("state", {})

        async def send_and_note_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            path = scope["path"]
            self.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()
            logger.info("%s %s %d prompt_tokens=%d completion_tokens=%d %.3fs", scope["method"], path, status,
                        state.get("prompt_tokens", 0), state.get("completion_tokens", 0),
                        time.perf_counter() - start)


class _Run:
    """One engine request seen from the event loop.

    The engine thread calls `_on_tokens` with each batch of new ids and once with [] at the end;
    the batches cross into the loop through `call_soon_threadsafe`. `texts()` yields the decoded
    text up to the first stop string, which cancels the request (reason "stop"). `close()` must
    follow every run, once: it cancels an unfinished request and records its metrics.
    """

    def __init__(self, engine: Engine, metrics: Metrics, request: Request, stop_text: StopText,
                 prompt_ids: list[int], params: SamplingParams, kind: str, draft_tokens: int | None = None) -> None:
        self.id, self.created = f"{kind}-{uuid.uuid4().hex}", int(time.time())
        self._engine, self._metrics, self._state = engine, metrics, request.state
        self._loop = asyncio.get_running_loop()
        self._batches: asyncio.Queue[list[int]] = asyncio.Queue()
        self._text = stop_text
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.req = engine.submit(prompt_ids, params, on_tokens=self._on_tokens, draft_tokens=draft_tokens)
        self._state.prompt_tokens = self.prompt_tokens
        metrics.prompt_tokens.inc(self.prompt_tokens)

    def _on_tokens(self, req: Any, ids: list[int]) -> None:   # on the engine thread
        try:
            self._loop.call_soon_threadsafe(self._batches.put_nowait, list(ids))
        except RuntimeError:    # the event loop has closed: nobody waits for these
            pass

    async def texts(self) -> AsyncIterator[str]:
        """The response text, piece by piece, until the request ends or a stop string appears."""
        while ids := await self._batches.get():
            self.completion_tokens += len(ids)
            if piece := self._text.push(ids):
                yield piece
            if self._text.stopped:
                self._engine.cancel(self.req, reason="stop")
                return
        if piece := self._text.finish():
            yield piece

    async def text(self, request: Request) -> str:
        """The whole response text; a client that disconnects meanwhile cancels the request."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(request))
        try:
            return "".join([piece async for piece in self.texts()])
        finally:
            watcher.cancel()

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self._engine.cancel(self.req)

    @property
    def finish_reason(self) -> str:
        return "stop" if self._text.stopped else self.req.finish_reason

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.req.cached))

    def close(self) -> None:
        if not self._text.stopped and not self.req.done.is_set():
            self._engine.cancel(self.req)
        self._state.completion_tokens = self.completion_tokens
        self._metrics.generation_tokens.inc(self.completion_tokens)
        if self.req.ttft is not None:
            self._metrics.ttft.observe(self.req.ttft)


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends (finished, failed or
    cut off by the client)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _finish_reason(run: _Run, call: ResponseToolCall | None) -> str:
    """"tool_calls" for a call the model finished; a call cut by max_tokens stays "length"."""
    return "tool_calls" if call and run.finish_reason == "stop" else run.finish_reason


def _sse(body: BaseModel | str) -> str:
    return f"data: {body if isinstance(body, str) else body.model_dump_json()}\n\n"


class _Service:
    """The route handlers and what they share: the model's tokenizer, defaults and the engine."""

    def __init__(self, model: Any, engine: Engine, metrics: Metrics, served_model_name: str,
                 max_model_len: int) -> None:
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: no tokenizer.model in the model folder")
        self.engine, self.metrics, self.name, self.max_model_len = engine, metrics, served_model_name, max_model_len
        self.tokenizer, self.defaults, self.vocab_size = model.tokenizer, model.generation_defaults, model.config.vocab_size
        self.chat_prompt = ChatPrompt.from_folder(model.path, model.tokenizer)
        self.created = int(time.time())

    # ---- shared steps -----------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest, prompt_len: int, param: str) -> SamplingParams:
        """The request's sampling parameters; those left out from generation_config.json."""
        room = self.max_model_len - prompt_len
        if body.max_tokens is None and room < 1:
            raise APIError(400, f"the prompt ({prompt_len} tokens) leaves no room to generate within "
                                f"max_model_len {self.max_model_len}", param=param, code="context_length_exceeded")
        if body.max_tokens is not None and body.max_tokens > room:
            raise APIError(400, f"the prompt ({prompt_len} tokens) + max_tokens ({body.max_tokens}) exceeds "
                                f"max_model_len {self.max_model_len}", param=param, code="context_length_exceeded")
        sampling = self.defaults.sampling(body.temperature, body.top_p, body.top_k)
        return SamplingParams(max_tokens=body.max_tokens or room, temperature=sampling["temperature"],
                              top_p=sampling["top_p"], top_k=sampling["top_k"],
                              seed=random.randrange(2**31) if body.seed is None else body.seed,
                              stop_ids=tuple(sampling["stop_ids"]))

    def _start(self, request: Request, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
               param: str, kind: str) -> _Run:
        params = self._sampling(body, len(prompt_ids), param)
        try:
            return _Run(self.engine, self.metrics, request, StopText(self.tokenizer, body.stop), prompt_ids,
                        params, kind, body.num_speculative_tokens)
        except QueueFull:
            raise APIError(429, f"the server is busy ({self.engine.stats()['waiting']} requests waiting); "
                                "retry later", type="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", type="server_error") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    @staticmethod
    def _stream_end(run: _Run, last: Callable[[], BaseModel], usage: Callable[[], BaseModel] | None) -> list[str]:
        """The events that close a stream: the finishing chunk, usage if asked for, [DONE]; an
        error event instead for a request aborted by the server."""
        if run.finish_reason == "abort":
            return [_sse(ErrorBody(error=APIError(503, ABORTED, type="server_error").detail)), _sse("[DONE]")]
        return [_sse(last())] + ([_sse(usage())] if usage is not None else []) + [_sse("[DONE]")]

    @staticmethod
    def _check_finished(run: _Run) -> None:
        if run.finish_reason == "abort":
            raise APIError(503, ABORTED, type="server_error")

    # ---- routes ------------------------------------------------------------------------------

    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.name, created=self.created, max_model_len=self.max_model_len)])

    async def health(self) -> dict[str, str]:
        error = getattr(self.engine, "error", None)
        if error is not None:  # the engine's thread died: every request would fail
            raise APIError(503, f"the engine stopped: {type(error).__name__}: {error}", type="server_error")
        return {"status": "ok"}

    async def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = self.tokenizer.encode(body.prompt, add_special_tokens=True)
        elif max(body.prompt) >= self.vocab_size:
            raise APIError(400, f"prompt token ids must lie in [0, {self.vocab_size})", param="prompt")
        else:
            prompt_ids = body.prompt
        run = self._start(request, body, prompt_ids, "prompt", "cmpl")
        if body.stream:
            return _EventStream(self._completion_events(run, body), on_close=run.close)
        try:
            text = await run.text(request)
        finally:
            run.close()
        self._check_finished(run)
        return JSONResponse(Completion(id=run.id, created=run.created, model=self.name, usage=run.usage(), choices=[
            CompletionChoice(text=text, finish_reason=run.finish_reason)]).model_dump(mode="json"))

    async def _completion_events(self, run: _Run, body: CompletionRequest) -> AsyncIterator[str]:
        def chunk(text: str, finish_reason: str | None = None) -> Completion:
            return Completion(id=run.id, created=run.created, model=self.name,
                              choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

        async for piece in run.texts():
            yield _sse(chunk(piece))
        usage = None
        if body.stream_options and body.stream_options.include_usage:
            usage = lambda: Completion(id=run.id, created=run.created, model=self.name, choices=[], usage=run.usage())
        for event in self._stream_end(run, lambda: chunk("", run.finish_reason), usage):
            yield event

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        tools = self._offered_tools(body)
        try:
            prompt_ids = self.chat_prompt.ids(glm_messages(body.messages, tools))
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        run = self._start(request, body, prompt_ids, "messages", "chatcmpl")
        chat_text = ChatText([tool.function.name for tool in tools])
        if body.stream:
            return _EventStream(self._chat_events(run, chat_text, body), on_close=run.close)
        try:
            content = chat_text.push(await run.text(request)).content
        finally:
            run.close()
        self._check_finished(run)
        content += chat_text.finish().content
        call = chat_text.call
        message = AssistantMessage(content=None, tool_calls=[call]) if call else AssistantMessage(content=content)
        choice = ChatChoice(message=message, finish_reason=_finish_reason(run, call))
        return JSONResponse(ChatCompletion(id=run.id, created=run.created, model=self.name, choices=[choice],
                                           usage=run.usage()).model_dump(mode="json"))

    def _offered_tools(self, body: ChatCompletionRequest) -> list[Tool]:
        """The tools the prompt offers: none for tool_choice "none", only the named one for a named choice."""
        tools, choice = body.tools or [], body.tool_choice
        if choice == "none":
            return []
        if choice is None or choice == "auto":
            return tools
        named = [tool for tool in tools if tool.function.name == choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        return named

    async def _chat_events(self, run: _Run, chat_text: ChatText, body: ChatCompletionRequest) -> AsyncIterator[str]:
        def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=run.id, created=run.created, model=self.name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)])

        def deltas(piece: Piece) -> Iterator[str]:
            if piece.content:
                yield _sse(chunk(ChatDelta(content=piece.content)))
            if piece.call:      # the call's first chunk: id, type, name and the arguments so far
                function = DeltaFunction(name=piece.call.function.name, arguments=piece.arguments)
                yield _sse(chunk(ChatDelta(tool_calls=[DeltaToolCall(index=0, id=piece.call.id, type="function",
                                                                     function=function)])))
            elif piece.arguments:
                yield _sse(chunk(ChatDelta(tool_calls=[DeltaToolCall(index=0, function=DeltaFunction(
                    arguments=piece.arguments))])))

        yield _sse(chunk(ChatDelta(role="assistant", content="")))
        async for text in run.texts():
            for event in deltas(chat_text.push(text)):
                yield event
        for event in deltas(chat_text.finish()):
            yield event
        call = chat_text.call
        usage = None
        if body.stream_options and body.stream_options.include_usage:
            usage = lambda: ChatCompletionChunk(id=run.id, created=run.created, model=self.name, choices=[],
                                                usage=run.usage())
        finish_reason = _finish_reason(run, call)
        for event in self._stream_end(run, lambda: chunk(ChatDelta(), finish_reason), usage):
            yield event


def create_app(model: Any, engine: Engine, *, served_model_name: str, max_model_len: int) -> FastAPI:
    """The OpenAI-compatible app serving `model` (a `glm_jax.Model` with a tokenizer) through
    `engine` (built by `model.engine(...)`, started and shut down by the caller). Requests must
    name `served_model_name`; prompt plus max_tokens must fit in `max_model_len`."""
    metrics = Metrics(engine)
    service = _Service(model, engine, metrics, served_model_name, max_model_len)
    app = FastAPI(title="glm-jax", summary="OpenAI-compatible GLM-4 server", version="1")
    app.add_middleware(_AccessLog, metrics=metrics)

    app.add_exception_handler(APIError, lambda request, e: e.response())
    app.add_exception_handler(RequestValidationError, lambda request, e: _validation_error(e).response())
    app.add_exception_handler(HTTPException, lambda request, e: APIError(e.status_code, str(e.detail)).response())
    app.add_exception_handler(Exception, lambda request, e: APIError(
        500, f"internal error: {type(e).__name__}: {e}", type="server_error").response())

    app.get("/v1/models", response_model=ModelList)(service.models)
    app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS,
             description="A chat completion; with stream=true, server-sent ChatCompletionChunk events "
                         "ending with [DONE].")(service.chat_completions)
    app.post("/v1/completions", response_model=Completion, responses=_ERRORS,
             description="A text completion; with stream=true, server-sent Completion chunks ending "
                         "with [DONE].")(service.completions)
    app.get("/health")(service.health)
    app.get("/metrics", response_class=Response)(service.metrics_text)
    return app
