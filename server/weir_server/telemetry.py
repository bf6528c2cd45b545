"""OpenTelemetry tracing of a Weir server: a server span per RPC continuing the caller's W3C trace context (from
gRPC metadata), and queue / prefill / decode child spans built afterwards from a request's timestamps.

Generate and Embed spans follow OpenTelemetry's GenAI semantic conventions: named `{operation} {model}` (`chat`,
`text_completion`, `embeddings`), with `gen_ai.*` request, response and usage attributes beside the `rpc.*` ones.

The engine never imports opentelemetry. Tracing is on only when an OTLP endpoint (or, in tests, an exporter)
is given, and off, with one warning, when the opentelemetry packages are missing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from weir_server.api.observer import GenerationRecord
    from weir_server.config import ObservabilityConfig
    from weir_server.engine.types import SamplingParams

logger = logging.getLogger(__name__)

PROVIDER = "weir"  # gen_ai.provider.name


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Tracing:
    """A tracer provider and what the server builds from it: RPC interceptor and per-request spans."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("weir_server")

    @contextlib.contextmanager
    def rpc_span(self, full_method: str, metadata: Iterable[tuple[str, Any]]) -> Iterator[Any]:
        """The current span of one RPC, continuing the trace context the caller put in its gRPC metadata.

        (opentelemetry-instrumentation-grpc's aio server interceptor cannot wrap handlers that stream with
        `context.write`, which ours do, so the server span is made here.)"""
        from opentelemetry import propagate, trace

        carrier = {k: v for k, v in metadata if isinstance(v, str)}
        service, _, method = full_method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        with self.tracer.start_as_current_span(
            full_method.lstrip("/"),
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    @staticmethod
    def set_rpc_status(span: Any, code: grpc.StatusCode) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not code.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))

    @staticmethod
    def current_context() -> Any:
        """The active context (inside a handler: the RPC's server span), to parent spans recorded later."""
        from opentelemetry import context

        return context.get_current()

    @staticmethod
    def describe_generation(parent: Any, operation: str, model: str, params: SamplingParams) -> None:
        """Name the RPC span of a Generate call that reached the engine `{operation} {model}` and give it the
        request's GenAI attributes (the sampling parameters it runs with, defaults included)."""
        from opentelemetry import trace

        span = trace.get_current_span(parent)
        if not span.is_recording():
            return
        span.update_name(f"{operation} {model}")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.frequency_penalty": params.frequency_penalty,
            "gen_ai.request.presence_penalty": params.presence_penalty,
        }
        if params.top_k:
            attributes["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if params.stop:
            attributes["gen_ai.request.stop_sequences"] = list(params.stop)
        if params.n != 1:
            attributes["gen_ai.request.choice.count"] = params.n
        span.set_attributes(attributes)

    @staticmethod
    def describe_embedding(model: str, input_tokens: int, dimensions: int | None) -> None:
        """Name the current (Embed RPC) span `embeddings {model}` and give it the GenAI attributes of its answer."""
        from opentelemetry import trace

        span = trace.get_current_span()
        if not span.is_recording():
            return
        span.update_name(f"embeddings {model}")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "embeddings",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": input_tokens,
        }
        if dimensions:
            attributes["gen_ai.embeddings.dimension.count"] = dimensions
        span.set_attributes(attributes)

    def record_generation(self, record: GenerationRecord, parent: Any) -> None:
        """Queue, prefill and decode spans of one Generate call under `parent`, plus its response and token counts
        on the RPC span."""
        from opentelemetry import trace

        attributes: dict[str, Any] = {
            "gen_ai.request.model": record.model,
            "gen_ai.response.model": record.model,
            "gen_ai.response.id": record.request_id,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "weir.cached_tokens": record.cached_tokens,
            "weir.request_id": record.request_id,
        }
        if record.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = list(record.finish_reasons)
        rpc_span = trace.get_current_span(parent)
        if rpc_span.is_recording():
            rpc_span.set_attributes(attributes)
        prefill_start = record.received
        if record.scheduled is not None:
            queued = record.arrival if record.arrival is not None else record.received
            self._span("weir.queue", parent, queued, record.scheduled, {})
            prefill_start = record.scheduled
        if record.first_token is None:
            return
        prefill = {"weir.prompt_tokens": record.prompt_tokens, "weir.cached_tokens": record.cached_tokens}
        self._span("weir.prefill", parent, prefill_start, record.first_token, prefill)
        decode: dict[str, Any] = {
            "weir.completion_tokens": record.completion_tokens,
            "weir.choices": record.num_choices,
        }
        if record.finish_reasons:
            decode["weir.finish_reasons"] = list(record.finish_reasons)
        self._span("weir.decode", parent, record.first_token, record.finished, decode)

    def _span(self, name: str, parent: Any, start: float, end: float, attributes: dict[str, Any]) -> None:
        span = self.tracer.start_span(name, context=parent, start_time=_ns(start), attributes=attributes)
        span.end(end_time=_ns(max(start, end)))

    def shutdown(self) -> None:
        """Flush spans still buffered and stop exporting."""
        self.provider.shutdown()


def create_tracing(config: ObservabilityConfig, exporter: Any = None) -> Tracing | None:
    """Tracing exporting over OTLP/gRPC to `config.otlp_endpoint` (or to `exporter`), else None."""
    if config.otlp_endpoint is None and exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("an OTLP endpoint is set but opentelemetry-sdk is not installed; tracing is off")
        return None
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            logger.warning("opentelemetry-exporter-otlp-proto-grpc is not installed; tracing is off")
            return None
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    logger.info("tracing: exporting spans to %s", config.otlp_endpoint or type(exporter).__name__)
    return Tracing(provider)
