"""One connected trace per request: the gateway's HTTP span -> its gRPC client span -> (W3C trace context in the
call's metadata, across a process boundary) the server's RPC span -> queue / prefill / decode spans."""

from __future__ import annotations

import json

import aiohttp
import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the opentelemetry packages")

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from ops_support import ServerProcess, running_gateway
from otlp_receiver import OtlpReceiver

GENERATE = "weir.v1.InferenceService/Generate"
SERVER_KIND = 2  # OTLP Span.SpanKind.SPAN_KIND_SERVER


@pytest.fixture
def gateway_tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "weir-gateway-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def _complete(http: aiohttp.ClientSession, url: str, stream: bool) -> dict:
    body = {"prompt": "the quick brown fox", "max_tokens": 5, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with http.post(f"{url}/v1/completions", json=body) as reply:
        assert reply.status == 200, await reply.text()
        if not stream:
            return await reply.json()
        usage = None
        async for raw in reply.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return {"usage": usage}


async def test_each_request_is_one_trace_from_gateway_through_grpc_into_the_engine(
    traced_server: ServerProcess, receiver: OtlpReceiver, gateway_tracing
):
    provider, exporter = gateway_tracing
    async with running_gateway([traced_server.target], provider) as url, aiohttp.ClientSession() as http:
        replies = [await _complete(http, url, stream=i == 2) for i in range(3)]
    spans = exporter.get_finished_spans()
    http_spans = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(http_spans) == 3
    assert len({s.context.trace_id for s in http_spans}) == 3  # one trace per request
    for http_span, reply in zip(sorted(http_spans, key=lambda s: s.start_time), replies, strict=True):
        trace_id = http_span.context.trace_id
        calls = [s for s in spans if s.kind == SpanKind.CLIENT and s.context.trace_id == trace_id]
        assert len(calls) == 1 and calls[0].name == f"/{GENERATE}"
        assert calls[0].parent is not None and calls[0].parent.span_id == http_span.context.span_id

        names = {GENERATE, "weir.prefill", "weir.decode"}
        remote = receiver.wait_for(f"{trace_id:032x}", names)
        assert {s.service for s in remote} == {"weir-server"}  # exported by the server process
        rpc = next(s for s in remote if s.name == GENERATE)
        assert rpc.kind == SERVER_KIND
        assert rpc.parent_span_id == f"{calls[0].context.span_id:016x}"  # continued from the gRPC metadata
        phases = {s.name: s for s in remote if s.parent_span_id == rpc.span_id}
        assert {"weir.prefill", "weir.decode"} <= set(phases)
        usage = reply["usage"]
        assert phases["weir.prefill"].attributes["weir.prompt_tokens"] == usage["prompt_tokens"]
        assert phases["weir.decode"].attributes["weir.completion_tokens"] == usage["completion_tokens"]
        assert rpc.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        assert rpc.attributes["rpc.grpc.status_code"] == 0
