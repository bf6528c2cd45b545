"""A scripted in-process InferenceService: records each GenerateRequest and answers with the messages a test sets,
so the client's tool, reasoning and constraint handling is tested without a model."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc


@dataclass
class ScriptedServer:
    """`target` to connect to; set `replies` before a call, read `requests` after it."""

    target: str = ""
    replies: list[pb.GenerateResponse] = field(default_factory=list)
    requests: list[pb.GenerateRequest] = field(default_factory=list)


class _ScriptedServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, script: ScriptedServer) -> None:
        self.script = script

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self.script.requests.append(request)
        yield from self.script.replies


@pytest.fixture
def scripted_server() -> Iterator[ScriptedServer]:
    script = ScriptedServer()
    server: Any = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(_ScriptedServicer(script), server)
    script.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield script
    server.stop(None)


@pytest.fixture
def tool_call_replies() -> list[pb.GenerateResponse]:
    """A choice that reasons, says a word, then streams one call of get_weather and ends with the whole call."""
    return [
        pb.GenerateResponse(request_id="r", model="m", reasoning_text="The user wants ", prompt_token_ids=[1, 2]),
        pb.GenerateResponse(request_id="r", model="m", reasoning_text="the weather."),
        pb.GenerateResponse(request_id="r", model="m", text="Checking."),
        pb.GenerateResponse(
            request_id="r", model="m", tool_call_deltas=[pb.ToolCallDelta(index=0, id="call_1", name="get_weather")]
        ),
        pb.GenerateResponse(
            request_id="r", model="m", tool_call_deltas=[pb.ToolCallDelta(index=0, arguments='{"city": ')]
        ),
        pb.GenerateResponse(
            request_id="r",
            model="m",
            tool_call_deltas=[pb.ToolCallDelta(index=0, arguments='"Paris"}')],
            finish_reason=pb.FINISH_REASON_TOOL_CALLS,
            usage=pb.Usage(prompt_tokens=2, completion_tokens=9, total_tokens=11),
            tool_calls=[pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}', index=0)],
        ),
    ]
