"""Running Generate calls for one HTTP request: backend choice, merged streams, and the JSON or SSE reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway import sse
from weir_gateway.backends import Backend, BackendPool
from weir_gateway.errors import ApiError, from_rpc_error
from weir_gateway.routing import prefix_key
from weir_gateway.telemetry import traced_generation

logger = logging.getLogger(__name__)

Item = tuple[int, pb.GenerateResponse]  # (prompt index, stream message)

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
# Server field names an endpoint renames to the body fields the client set: a table, or a function giving the
# body's name (None when the name is the same).
ParamRenames = Mapping[str, str] | Callable[[str], str | None]


@dataclass(frozen=True)
class CallContext:
    """What every backend call of one HTTP request carries: its id (as metadata) and its deadline."""

    request_id: str
    timeout_s: float

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", self.request_id),)


async def stream_generate(
    pool: BackendPool,
    model: str,
    requests: Sequence[pb.GenerateRequest],
    ctx: CallContext,
    *,
    renamed_params: ParamRenames | None = None,
) -> AsyncGenerator[Item, None]:
    """Yield the messages of one Generate call per request, merged; a backend found unreachable before
    any output is routed around and the request tried on another. `renamed_params` maps request fields
    the server may name in an error (e.g. `json_schema`) to the body field the client set."""
    try:
        traced = traced_generation(_stream_generate(pool, model, requests, ctx), model, requests)
        async with contextlib.aclosing(traced) as stream:
            async for item in stream:
                yield item
    except grpc.aio.AioRpcError as e:
        error = from_rpc_error(e)
        if renamed_params is None or error.param is None:
            raise
        if callable(renamed_params):
            param = renamed_params(error.param)
        else:
            param = renamed_params.get(error.param)
        if param is None:
            raise
        raise rename_param(error, param) from None


def rename_param(error: ApiError, param: str) -> ApiError:
    """The same error naming `param` instead (its message's leading 'field:' too)."""
    message = error.message
    if error.param and message.startswith(f"{error.param}:"):
        message = f"{param}:{message[len(error.param) + 1 :]}"
    return ApiError(error.status, message, param=param, code=error.code, retry_after_s=error.retry_after_s)


async def _stream_generate(
    pool: BackendPool, model: str, requests: Sequence[pb.GenerateRequest], ctx: CallContext
) -> AsyncGenerator[Item, None]:
    key = prefix_key(requests[0], pool.config.routing_prefix_bytes) if requests else None
    tried: set[Backend] = set()
    await pool.look_for(model, pb.MODEL_TASK_GENERATE)
    while True:
        backend = pool.choose(model, pb.MODEL_TASK_GENERATE, frozenset(tried), key)
        started = False
        with pool.lease(backend):
            try:
                async with contextlib.aclosing(_merged_calls(backend.stub, requests, ctx)) as merged:
                    async for item in merged:
                        started = True
                        yield item
                pool.record_success(backend)
                return
            except grpc.aio.AioRpcError as e:
                pool.record_failure(backend, e)
                tried.add(backend)
                # Once output went to the client a retry would repeat it: only a failure before it moves on.
                if started or not pool.retry_elsewhere(e, model, pb.MODEL_TASK_GENERATE, tried):
                    raise
        await pool.backoff(len(tried))


async def _merged_calls(
    stub: Any, requests: Sequence[pb.GenerateRequest], ctx: CallContext
) -> AsyncGenerator[Item, None]:
    """All calls' messages as they arrive; closing this cancels every call still running."""
    calls = [stub.Generate(r, metadata=ctx.metadata, timeout=ctx.timeout_s) for r in requests]
    if len(calls) == 1:
        try:
            async for message in calls[0]:
                yield 0, message
        finally:
            calls[0].cancel()
        return
    queue: asyncio.Queue[tuple[int, pb.GenerateResponse | None, BaseException | None]] = asyncio.Queue(len(calls))

    async def pump(index: int, call: Any) -> None:
        try:
            async for message in call:
                await queue.put((index, message, None))
            await queue.put((index, None, None))
        except grpc.aio.AioRpcError as e:
            await queue.put((index, None, e))

    tasks = [asyncio.create_task(pump(i, call)) for i, call in enumerate(calls)]
    try:
        running = len(calls)
        while running:
            index, message, error = await queue.get()
            if error is not None:
                raise error
            if message is None:
                running -= 1
            else:
                yield index, message
    finally:
        for call in calls:
            call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def finish_reason(message: pb.GenerateResponse) -> str | None:
    """The OpenAI finish_reason of a message (None while the choice runs); engine failures raise."""
    reason = message.finish_reason
    if reason == pb.FINISH_REASON_UNSPECIFIED:
        return None
    if reason == pb.FINISH_REASON_CANCELLED:
        raise ApiError(503, "the server cancelled the request (it may be shutting down)", code="cancelled")
    if reason == pb.FINISH_REASON_ERROR:
        raise ApiError(500, "the engine failed while generating this request", code="engine_error")
    return FINISH_REASONS[reason]


@dataclass
class UsageTally:
    """Token counts over every prompt and choice of a request (prompt tokens count once per prompt)."""

    prompt: dict[int, int] = field(default_factory=dict)
    cached: dict[int, int] = field(default_factory=dict)
    completion: int = 0

    def add(self, prompt_index: int, usage: pb.Usage) -> None:
        self.prompt[prompt_index] = usage.prompt_tokens
        self.cached[prompt_index] = max(self.cached.get(prompt_index, 0), usage.cached_tokens)
        self.completion += usage.completion_tokens

    def as_json(self) -> dict[str, Any]:
        prompt = sum(self.prompt.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion,
            "total_tokens": prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())},
        }


class ChoiceState(Protocol):
    """What a renderer keeps of each choice, at least."""

    finish_reason: str | None
    stop_reason: str | None


C = TypeVar("C", bound=ChoiceState)


class Renderer(Generic[C]):
    """Turns stream messages into one endpoint's OpenAI JSON; chat and completions subclass it, keeping a `C` per
    choice."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, model: str, n: int, include_usage: bool, fingerprint: str) -> None:
        self.response_id = response_id
        self.model = model
        self.n = n
        self.include_usage = include_usage
        self.fingerprint = fingerprint
        self.created = int(time.time())
        self.usage = UsageTally()
        self.choices: dict[int, C] = {}

    def envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def observe(self, prompt_index: int, message: pb.GenerateResponse) -> tuple[int, str | None]:
        """Book-keeping common to every message: the choice's global index and its finish reason."""
        if message.model:
            self.model = message.model
        if message.HasField("usage"):
            self.usage.add(prompt_index, message.usage)
        return prompt_index * self.n + message.index, finish_reason(message)

    def start_chunks(self, total_choices: int) -> list[dict[str, Any]]:
        """Chunks sent before the first delta (chat's role chunks)."""
        return []

    def update(self, prompt_index: int, message: pb.GenerateResponse) -> object:
        """Record a message in its choice (what it returns is the subclass's, for its `chunks`)."""
        raise NotImplementedError

    def chunks(self, prompt_index: int, message: pb.GenerateResponse) -> list[dict[str, Any]]:
        """Record a message; the stream chunks it makes (none when it carries nothing to tell)."""
        raise NotImplementedError

    def choice_fields(self, choice: C) -> dict[str, Any]:
        """A whole choice's output fields in the body (chat's message, completions' text) and its logprobs."""
        raise NotImplementedError

    def body(self) -> dict[str, Any]:
        """The answer sent whole: every choice in index order, and the usage."""
        choices = [
            {"index": index}
            | self.choice_fields(choice)
            | {"finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
            for index, choice in sorted(self.choices.items())
        ]
        return self.envelope(self.object_name) | {"choices": choices, "usage": self.usage.as_json()}

    def with_usage_field(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """With include_usage, every chunk carries `usage` (null until the last), as OpenAI sends it."""
        return chunk | {"usage": None} if self.include_usage else chunk

    def usage_chunk(self) -> dict[str, Any]:
        return self.envelope(self.chunk_object_name) | {"choices": [], "usage": self.usage.as_json()}


async def respond(
    request: web.Request,
    stream: AsyncGenerator[Item, None],
    renderer: Renderer[Any],
    *,
    streaming: bool,
    total_choices: int,
) -> web.StreamResponse:
    """Answer with one JSON body, or with SSE chunks once the first output arrived (earlier errors keep
    their HTTP status; later ones become an error event that ends the stream)."""
    async with contextlib.aclosing(stream):
        if not streaming:
            async for prompt_index, message in stream:
                renderer.update(prompt_index, message)
            return web.json_response(renderer.body(), dumps=sse.dumps)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise ApiError(502, "the backend ended the stream without output") from None
        response = await sse.open_stream(request)
        try:
            for chunk in renderer.start_chunks(total_choices):
                await sse.send_event(response, renderer.with_usage_field(chunk))
            await _send_chunk(response, renderer, first)
            async for item in stream:
                await _send_chunk(response, renderer, item)
            if renderer.include_usage:
                await sse.send_event(response, renderer.usage_chunk())
            await sse.send_done(response)
        except (grpc.aio.AioRpcError, ApiError) as e:
            error = from_rpc_error(e) if isinstance(e, grpc.aio.AioRpcError) else e
            logger.warning("stream %s failed after it started: %s", renderer.response_id, error.message)
            await sse.send_event(response, error.body())
            await response.write_eof()
        except ConnectionResetError:
            logger.info("client of %s went away; its generation was cancelled", renderer.response_id)
        return response


async def _send_chunk(response: web.StreamResponse, renderer: Renderer[Any], item: Item) -> None:
    for chunk in renderer.chunks(*item):
        await sse.send_event(response, renderer.with_usage_field(chunk))
