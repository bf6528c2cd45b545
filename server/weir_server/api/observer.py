"""Per-RPC observation for the servicer: status counts, request ids in log lines, and one GenerationRecord per
Generate call turned into metrics and trace spans. Every piece is optional; without them this costs nothing."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

from weir_server.engine.types import GenerationOutput, SamplingParams
from weir_server.logging_setup import request_id_var
from weir_server.metrics import ServerMetrics
from weir_server.telemetry import Tracing

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# When the RPC reached the server, so a request's latency includes its tokenization.
rpc_started_var: ContextVar[float | None] = ContextVar("weir_rpc_started", default=None)
# Health watches last for ever; routers poll GetLoad (the gateway once a second per backend): neither is traffic.
UNOBSERVED_SERVICES = ("/grpc.health.v1.", "/grpc.reflection.", "/weir.v1.ControlService/GetLoad")


@dataclass(frozen=True)
class GenerationRecord:
    """What one Generate call measured; times are `time.time()` seconds, None when not reached or not known."""

    model: str
    request_id: str
    received: float  # the servicer got the call
    arrival: float | None  # the engine admitted it
    scheduled: float | None  # the engine first scheduled it (prefill began)
    first_token: float | None
    finished: float
    prompt_tokens: int
    completion_tokens: int  # over all choices
    cached_tokens: int
    num_choices: int
    finish_reasons: tuple[str, ...]  # one per finished choice
    token_gaps: tuple[float, ...] = ()  # seconds between consecutive tokens of a choice

    @property
    def complete(self) -> bool:
        return len(self.finish_reasons) == self.num_choices


@dataclass
class GenerationObserver:
    """Follows one Generate call's outputs; `finish()` hands the record to metrics and tracing."""

    observability: Observability
    model: str
    request_id: str = ""
    num_choices: int = 1
    received: float = field(default_factory=lambda: rpc_started_var.get() or time.time())
    parent: Any = None
    _first_token: float | None = None
    _last_token: dict[int, float] = field(default_factory=dict)
    _gaps: list[float] = field(default_factory=list)
    _usage: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    _reasons: list[str] = field(default_factory=list)
    _arrival: float | None = None
    _scheduled: float | None = None

    def output(self, output: GenerationOutput) -> None:
        now = time.time()
        if output.token_ids:
            self._first_token = self._first_token or now
            previous = self._last_token.get(output.index)
            if previous is not None:  # tokens merged into one output share the gap since the previous one
                self._gaps.extend([(now - previous) / len(output.token_ids)] * len(output.token_ids))
            self._last_token[output.index] = now
        if output.usage is not None:
            u = output.usage
            self._usage[output.index] = (u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        if output.finish_reason is not None:
            self._reasons.append(output.finish_reason.value)
        timing = output.timing  # engine timestamps, on each choice's final output
        if timing is not None:
            self._arrival = timing.arrival_time
            first = timing.first_scheduled_time
            self._scheduled = first if self._scheduled is None else min(self._scheduled, first or self._scheduled)

    def finish(self) -> None:
        usage = list(self._usage.values())
        record = GenerationRecord(
            model=self.model,
            request_id=self.request_id,
            received=self.received,
            arrival=self._arrival,
            scheduled=self._scheduled,
            first_token=self._first_token,
            finished=time.time(),
            prompt_tokens=usage[0][0] if usage else 0,
            completion_tokens=sum(u[1] for u in usage),
            cached_tokens=max((u[2] for u in usage), default=0),
            num_choices=self.num_choices,
            finish_reasons=tuple(self._reasons),
            token_gaps=tuple(self._gaps),
        )
        o = self.observability
        if o.metrics is not None:
            o.metrics.observe_generation(record)
        if o.tracing is not None:
            o.tracing.record_generation(record, self.parent)


@dataclass
class Observability:
    """The server's optional metrics and tracing, and what the servicer asks of them."""

    metrics: ServerMetrics | None = None
    tracing: Tracing | None = None

    def generation(
        self, model: str, request_id: str, params: SamplingParams, operation: str = "text_completion"
    ) -> GenerationObserver:
        """The observer of one Generate call reaching the engine; `operation` is its GenAI operation name."""
        parent = None
        if self.tracing is not None:
            parent = self.tracing.current_context()
            self.tracing.describe_generation(parent, operation, model, params)
        return GenerationObserver(self, model, request_id, params.n, parent=parent)

    def embedding(self, model: str, input_tokens: int, dimensions: int | None) -> None:
        """One Embed call answered (its span gets the GenAI attributes)."""
        if self.tracing is not None:
            self.tracing.describe_embedding(model, input_tokens, dimensions)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [RpcInterceptor(self)]


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Around every RPC but health and reflection: its request id on log lines, its server span (continuing the
    caller's trace), and its count by method and final status code."""

    def __init__(self, observability: Observability) -> None:
        self.observability = observability

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(UNOBSERVED_SERVICES):
            return handler
        metadata = tuple(details.invocation_metadata or ())  # type: ignore[attr-defined]
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(behavior, method, metadata)})  # type: ignore[no-any-return]
        return handler

    def _wrap(self, behavior: Behavior, method: str, metadata: tuple[tuple[str, Any], ...]) -> Behavior:
        # grpc.aio tells async-generator handlers from coroutine ones (which stream with context.write): keep the kind.
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self._observe(method, request, context, metadata):
                    async for message in behavior(request, context):
                        yield message

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._observe(method, request, context, metadata):
                return await behavior(request, context)

        return call

    @contextlib.contextmanager
    def _observe(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, metadata: tuple[tuple[str, Any], ...]
    ) -> Iterator[None]:
        given = getattr(request, "request_id", "") or next((v for k, v in metadata if k == REQUEST_ID_KEY), "")
        request_id_var.set(str(given) or None)
        rpc_started_var.set(time.time())
        tracing, metrics = self.observability.tracing, self.observability.metrics
        with tracing.rpc_span(method, metadata) if tracing is not None else contextlib.nullcontext() as span:
            error: BaseException | None = None
            try:
                yield
            except BaseException as e:
                error = e
                raise
            finally:
                code = _final_code(context, error)
                if metrics is not None:
                    metrics.observe_rpc(method.rsplit("/", 1)[-1], code.name)
                if tracing is not None:
                    tracing.set_rpc_status(span, code)


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
