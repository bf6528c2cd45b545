"""One connected trace per request: the gateway's HTTP span -> its GenAI client span -> its gRPC client span -> (W3C
trace context in the call's metadata, across a process boundary) the server's RPC span -> queue / prefill / decode
spans. The GenAI spans follow OpenTelemetry's GenAI semantic conventions on both sides."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the opentelemetry packages")

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from ops_support import TINY_MODEL_NAME, ServerProcess, running_gateway
from otlp_receiver import OtlpReceiver, ReceivedSpan

GENERATE = "weir.v1.InferenceService/Generate"
SERVER_KIND = 2  # OTLP Span.SpanKind.SPAN_KIND_SERVER


@pytest.fixture
def gateway_tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "weir-gateway-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as reply:
        assert reply.status == 200, await reply.text()
        if not body.get("stream"):
            return await reply.json()
        answer: dict[str, Any] = {}
        async for raw in reply.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                answer["model"] = chunk["model"]
                answer["usage"] = chunk.get("usage") or answer.get("usage")
        return answer


async def _complete(http: aiohttp.ClientSession, url: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": TINY_MODEL_NAME, "prompt": "the quick brown fox", "max_tokens": 5,
                            "temperature": 0, "stream": stream}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return await _post(http, f"{url}/v1/completions", body)


def _one(spans: list[ReadableSpan], kind: SpanKind, trace_id: int, name: str | None = None) -> ReadableSpan:
    found = [s for s in spans if s.kind == kind and s.context.trace_id == trace_id and name in (None, s.name)]
    assert len(found) == 1, [(s.name, s.kind) for s in spans if s.context.trace_id == trace_id]
    return found[0]


def _plain(attributes: Any) -> dict[str, Any]:
    """A span's attributes as the OTLP receiver shows them (the SDK keeps sequences as tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()}


def _server_span(receiver: OtlpReceiver, trace_id: int, name: str) -> ReceivedSpan:
    remote = receiver.wait_for(f"{trace_id:032x}", {name})
    rpc = [s for s in remote if s.name == name]
    assert len(rpc) == 1 and rpc[0].kind == SERVER_KIND, [s.name for s in remote]
    return rpc[0]


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
        inference = _one(spans, SpanKind.CLIENT, trace_id, f"text_completion {reply['model']}")
        call = _one(spans, SpanKind.CLIENT, trace_id, f"/{GENERATE}")
        assert inference.parent is not None and inference.parent.span_id == http_span.context.span_id
        assert call.parent is not None and call.parent.span_id == inference.context.span_id

        rpc = _server_span(receiver, trace_id, f"text_completion {reply['model']}")
        assert rpc.service == "weir-server"  # exported by the server process
        assert rpc.attributes["rpc.method"] == "Generate"
        assert rpc.parent_span_id == f"{call.context.span_id:016x}"  # continued from the gRPC metadata
        remote = receiver.wait_for(f"{trace_id:032x}", {"weir.prefill", "weir.decode"})
        phases = {s.name: s for s in remote if s.parent_span_id == rpc.span_id}
        assert {"weir.prefill", "weir.decode"} <= set(phases)
        usage = reply["usage"]
        assert phases["weir.prefill"].attributes["weir.prompt_tokens"] == usage["prompt_tokens"]
        assert phases["weir.decode"].attributes["weir.completion_tokens"] == usage["completion_tokens"]
        assert rpc.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        assert rpc.attributes["rpc.grpc.status_code"] == 0


async def test_completion_spans_carry_the_gen_ai_request_response_and_usage_attributes(
    traced_server: ServerProcess, receiver: OtlpReceiver, gateway_tracing
):
    provider, exporter = gateway_tracing
    body = {
        "model": TINY_MODEL_NAME, "prompt": "one two three", "max_tokens": 6, "temperature": 0.5, "top_p": 0.9,
        "top_k": 20, "seed": 7, "stop": ["zzz"], "frequency_penalty": 0.25, "presence_penalty": 0.5,
    }  # fmt: skip
    async with running_gateway([traced_server.target], provider) as url, aiohttp.ClientSession() as http:
        reply = await _post(http, f"{url}/v1/completions", body)
    model, usage = reply["model"], reply["usage"]
    (http_span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    trace_id = http_span.context.trace_id
    gateway = _one(exporter.get_finished_spans(), SpanKind.CLIENT, trace_id, f"text_completion {model}")
    server = _server_span(receiver, trace_id, f"text_completion {model}")

    request = {
        "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "weir", "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": 6, "gen_ai.request.top_k": 20, "gen_ai.request.seed": 7,
        "gen_ai.request.stop_sequences": ["zzz"],
    }  # fmt: skip
    floats = {"temperature": 0.5, "top_p": 0.9, "frequency_penalty": 0.25, "presence_penalty": 0.5}
    answer = {
        "gen_ai.response.model": model,
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
    }
    for attributes in (_plain(gateway.attributes), server.attributes):
        assert request.items() <= attributes.items()
        assert answer.items() <= attributes.items()
        for name, value in floats.items():
            assert attributes[f"gen_ai.request.{name}"] == pytest.approx(value)
        assert attributes["gen_ai.response.id"]
        assert list(attributes["gen_ai.response.finish_reasons"]) in (["length"], ["stop"], ["stop_sequence"])


async def test_chat_spans_are_chat_operations_on_both_sides(
    traced_server: ServerProcess, receiver: OtlpReceiver, gateway_tracing
):
    provider, exporter = gateway_tracing
    body = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    async with running_gateway([traced_server.target], provider) as url, aiohttp.ClientSession() as http:
        reply = await _post(http, f"{url}/v1/chat/completions", body)
    model, usage = reply["model"], reply["usage"]
    (http_span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    trace_id = http_span.context.trace_id
    gateway = _one(exporter.get_finished_spans(), SpanKind.CLIENT, trace_id, f"chat {model}")
    server = _server_span(receiver, trace_id, f"chat {model}")
    for attributes in (_plain(gateway.attributes), server.attributes):
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.request.max_tokens"] == 4
        assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]


async def test_embeddings_spans_count_input_tokens_on_both_sides(
    traced_server: ServerProcess, receiver: OtlpReceiver, gateway_tracing, packaged_model_paths
):
    provider, exporter = gateway_tracing
    body = {"model": str(packaged_model_paths.minilm_dir), "input": ["a short text", "another one"]}
    async with running_gateway([traced_server.target], provider) as url, aiohttp.ClientSession() as http:
        reply = await _post(http, f"{url}/v1/embeddings", body)
    model, tokens = reply["model"], reply["usage"]["prompt_tokens"]
    (http_span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    trace_id = http_span.context.trace_id
    gateway = _one(exporter.get_finished_spans(), SpanKind.CLIENT, trace_id, f"embeddings {model}")
    call = _one(exporter.get_finished_spans(), SpanKind.CLIENT, trace_id, "/weir.v1.InferenceService/Embed")
    assert call.parent is not None and call.parent.span_id == gateway.context.span_id
    server = _server_span(receiver, trace_id, f"embeddings {model}")
    for attributes in (_plain(gateway.attributes), server.attributes):
        assert attributes["gen_ai.operation.name"] == "embeddings"
        assert attributes["gen_ai.provider.name"] == "weir"
        assert attributes["gen_ai.response.model"] == model
        assert attributes["gen_ai.usage.input_tokens"] == tokens
    assert gateway.attributes["gen_ai.embeddings.dimension.count"] == len(reply["data"][0]["embedding"])
