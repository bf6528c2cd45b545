"""OpenTelemetry tracing of the gateway: a server span per HTTP request (continuing a caller's `traceparent`),
a GenAI client span per inference (chat, text completion, embeddings: OpenTelemetry's GenAI semantic conventions,
named `{operation} {model}`), and client spans on the gRPC calls it makes, whose W3C trace context travels to the
Weir server in the call's metadata. On only when the CLI finds OTEL_EXPORTER_OTLP_ENDPOINT (or a test passes a
provider); off, with one warning, when the opentelemetry packages are missing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from weir.v1 import inference_pb2 as pb
from weir_gateway.outcome import handle_and_record

logger = logging.getLogger(__name__)

TRACER_PROVIDER = web.AppKey("tracer_provider", object)  # an opentelemetry TracerProvider, or None
UNTRACED_PATHS = frozenset({"/health", "/metrics", "/version"})  # probes and scrapes would bury the requests
UNTRACED_GRPC_SERVICES = ("grpc.health.v1.",)  # the backend health watches last for ever
UNTRACED_GRPC_METHODS = ("/weir.v1.ControlService/GetLoad",)  # the load polls: one a second per backend
PROVIDER = "weir"  # gen_ai.provider.name
# The tracer of the request being handled (None when tracing is off), so the code running backend calls can open
# GenAI spans without the request in hand. Set by the tracing middleware, in the request's own task.
_tracer: ContextVar[Any] = ContextVar("weir_gateway_tracer", default=None)


def create_tracer_provider(endpoint: str | None, service_name: str = "weir-gateway") -> Any | None:
    """A tracer provider batching spans to the OTLP/gRPC collector at `endpoint`; None when there is none."""
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("an OTLP endpoint is set but the opentelemetry packages are not installed; tracing is off")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    logger.info("tracing: exporting spans to %s", endpoint)
    return provider


def tracing_middlewares(provider: Any | None) -> list[Middleware]:
    """The HTTP server-span middleware for `provider` (put it first), or nothing when tracing is off.

    (opentelemetry-instrumentation-aiohttp-server's middleware only works after its global `instrument()`, which
    patches every aiohttp Application in the process, so the span is made here with the plain API.)"""
    if provider is None:
        return []
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Status, StatusCode

    tracer = provider.get_tracer("weir_gateway")

    @web.middleware
    async def tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNTRACED_PATHS:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        attributes = {"http.request.method": request.method, "url.path": request.path, "http.route": route}
        with tracer.start_as_current_span(
            f"{request.method} {route}".rstrip(),
            context=propagate.extract(dict(request.headers)),  # a caller's `traceparent` continues its trace
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        ) as span:

            def record(status: int) -> None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))

            token = _tracer.set(tracer)
            try:
                return await handle_and_record(request, handler, record)
            finally:
                _tracer.reset(token)

    return [tracing]


def client_interceptors(provider: Any | None) -> list[grpc.aio.ClientInterceptor]:
    """Channel interceptors making a client span per backend call and injecting its trace context into the
    call's metadata (W3C `traceparent`); none when tracing is off."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

    skip = filters.any_of(
        *(filters.service_prefix(s) for s in UNTRACED_GRPC_SERVICES),
        *(filters.full_method_name(m) for m in UNTRACED_GRPC_METHODS),
    )
    # opentelemetry-instrumentation-grpc leaves aio_client_interceptors unannotated.
    interceptors = aio_client_interceptors(tracer_provider=provider, filter_=filters.negate(skip))  # type: ignore[no-untyped-call]
    return list(interceptors)


def _request_attributes(operation: str, model: str, params: pb.SamplingParams | None = None) -> dict[str, Any]:
    """gen_ai.* attributes of a request: the operation, the model asked for and the parameters the client set."""
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER}
    if model:
        attributes["gen_ai.request.model"] = model
    if params is None:
        return attributes
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if params.HasField(name):
            attributes[f"gen_ai.request.{name}"] = getattr(params, name)
    for name in ("top_k", "frequency_penalty", "presence_penalty"):
        if getattr(params, name):
            attributes[f"gen_ai.request.{name}"] = getattr(params, name)
    if params.stop:
        attributes["gen_ai.request.stop_sequences"] = list(params.stop)
    if params.HasField("n") and params.n != 1:
        attributes["gen_ai.request.choice.count"] = params.n
    return attributes


def _start_inference_span(tracer: Any, attributes: dict[str, Any]) -> Any:
    from opentelemetry import trace

    name = f"{attributes['gen_ai.operation.name']} {attributes.get('gen_ai.request.model', '')}".rstrip()
    return tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes)


def _failed(span: Any, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    kind = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, kind))


class _Responses:
    """What a GenAI span tells of the answer, gathered from the Generate messages as they pass."""

    def __init__(self) -> None:
        self.response_id = ""
        self.model = ""
        self.finish_reasons: list[str] = []
        self.prompt_tokens: dict[int, int] = {}  # per prompt: its choices share the prompt
        self.completion_tokens = 0

    def add(self, prompt_index: int, message: pb.GenerateResponse) -> None:
        self.response_id = self.response_id or message.request_id
        self.model = self.model or message.model
        if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            name = pb.FinishReason.Name(message.finish_reason)
            self.finish_reasons.append(name.removeprefix("FINISH_REASON_").lower())
        if message.HasField("usage"):
            self.prompt_tokens[prompt_index] = message.usage.prompt_tokens
            self.completion_tokens += message.usage.completion_tokens

    def attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        if self.response_id:
            attributes["gen_ai.response.id"] = self.response_id
        if self.model:
            attributes["gen_ai.response.model"] = self.model
        if self.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = self.finish_reasons
        if self.prompt_tokens:
            attributes["gen_ai.usage.input_tokens"] = sum(self.prompt_tokens.values())
            attributes["gen_ai.usage.output_tokens"] = self.completion_tokens
        return attributes


Item = tuple[int, pb.GenerateResponse]


def traced_generation(
    stream: AsyncGenerator[Item, None], model: str, requests: Sequence[pb.GenerateRequest]
) -> AsyncGenerator[Item, None]:
    """`stream` (the Generate calls of one HTTP request) inside a GenAI client span, `chat` for conversations and
    `text_completion` for prompts; `stream` itself when tracing is off."""
    tracer = _tracer.get()
    if tracer is None or not requests:
        return stream
    first = requests[0]
    operation = "chat" if first.WhichOneof("input") == "messages" else "text_completion"
    span = _start_inference_span(tracer, _request_attributes(operation, model, first.sampling_params))
    return _traced(stream, span)


async def _traced(stream: AsyncGenerator[Item, None], span: Any) -> AsyncGenerator[Item, None]:
    from opentelemetry import trace

    responses = _Responses()
    try:
        async with contextlib.aclosing(stream):
            while True:
                # Current only while the calls run, so their gRPC spans are its children; never across a yield,
                # where the caller's code runs.
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    try:
                        item = await anext(stream)
                    except StopAsyncIteration:
                        return
                responses.add(*item)
                yield item
    except GeneratorExit:
        raise  # the caller stopped reading (it finished, failed on its side, or its client went away)
    except BaseException as e:
        _failed(span, e)
        raise
    finally:
        span.set_attributes(responses.attributes())
        span.end()


@contextlib.contextmanager
def embeddings_span(model: str) -> Iterator[Callable[[pb.EmbedResponse], None]]:
    """A GenAI client span (`embeddings {model}`) around an Embed call; call what it yields with the reply."""
    tracer = _tracer.get()
    if tracer is None:
        yield lambda reply: None
        return
    from opentelemetry import trace

    span = _start_inference_span(tracer, _request_attributes("embeddings", model))

    def record(reply: pb.EmbedResponse) -> None:
        span.set_attributes(
            {"gen_ai.response.model": reply.model, "gen_ai.usage.input_tokens": reply.usage.prompt_tokens}
        )
        if reply.embeddings:
            span.set_attribute("gen_ai.embeddings.dimension.count", len(reply.embeddings[0].values))

    with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        try:
            yield record
        except BaseException as e:
            _failed(span, e)
            raise
