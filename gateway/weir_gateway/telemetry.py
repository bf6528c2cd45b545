"""OpenTelemetry tracing of the gateway: a server span per HTTP request (continuing a caller's `traceparent`),
and client spans on the gRPC calls it makes, whose W3C trace context travels to the Weir server in the call's
metadata. On only when the CLI finds OTEL_EXPORTER_OTLP_ENDPOINT (or a test passes a provider); off, with one
warning, when the opentelemetry packages are missing.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from weir_gateway.outcome import handle_and_record

logger = logging.getLogger(__name__)

TRACER_PROVIDER = web.AppKey("tracer_provider", object)  # an opentelemetry TracerProvider, or None
UNTRACED_PATHS = frozenset({"/health", "/metrics", "/version"})  # probes and scrapes would bury the requests
UNTRACED_GRPC_SERVICES = ("grpc.health.v1.",)  # the backend health watches last for ever


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

            return await handle_and_record(request, handler, record)

    return [tracing]


def client_interceptors(provider: Any | None) -> list[grpc.aio.ClientInterceptor]:
    """Channel interceptors making a client span per backend call and injecting its trace context into the
    call's metadata (W3C `traceparent`); none when tracing is off."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

    skip = filters.any_of(*(filters.service_prefix(s) for s in UNTRACED_GRPC_SERVICES))
    # opentelemetry-instrumentation-grpc leaves aio_client_interceptors unannotated.
    interceptors = aio_client_interceptors(tracer_provider=provider, filter_=filters.negate(skip))  # type: ignore[no-untyped-call]
    return list(interceptors)
