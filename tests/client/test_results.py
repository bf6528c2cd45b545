"""Streamed GenerateResponse messages as chunks and Completions: reasoning, tool-call deltas, complete tool calls;
and both clients carrying the tool keywords to a scripted server and its tool calls back."""

from __future__ import annotations

from typing import Any

import pytest

from weir.v1 import inference_pb2 as pb
from weir_client import AsyncWeirClient, Choice, ToolCall, ToolCallDelta, WeirClient, collect
from weir_client import _protocol as proto

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_chunk_carries_reasoning_and_tool_call_deltas() -> None:
    message = pb.GenerateResponse(
        reasoning_text="Think.",
        tool_call_deltas=[pb.ToolCallDelta(index=0, id="c", name="f"), pb.ToolCallDelta(index=1, arguments="{}")],
    )
    chunk = proto.generation_chunk(message)
    assert chunk.reasoning_text == "Think." and chunk.text == ""
    assert chunk.tool_call_deltas == [ToolCallDelta(0, "c", "f", ""), ToolCallDelta(1, None, None, "{}")]
    assert chunk.tool_calls == [] and not chunk.finished


def test_last_chunk_has_the_complete_calls_and_finish_reason_tool_calls(
    tool_call_replies: list[pb.GenerateResponse],
) -> None:
    chunk = proto.generation_chunk(tool_call_replies[-1])
    assert chunk.finish_reason == "tool_calls"
    assert chunk.tool_calls == [ToolCall("call_1", "get_weather", '{"city": "Paris"}', 0)]


def test_collect_joins_reasoning_text_and_takes_the_final_calls(tool_call_replies: list[pb.GenerateResponse]) -> None:
    completion = collect(proto.generation_chunk(m) for m in tool_call_replies)
    assert completion.reasoning_text == "The user wants the weather."
    assert completion.text == "Checking."
    assert completion.tool_calls == [ToolCall("call_1", "get_weather", '{"city": "Paris"}', 0)]
    assert completion.choices[0].finish_reason == "tool_calls"


def test_collect_assembles_calls_from_deltas_by_index_when_the_last_message_has_none() -> None:
    deltas = [
        [pb.ToolCallDelta(index=0, id="a", name="get_weather"), pb.ToolCallDelta(index=1, id="b", name="get_time")],
        [pb.ToolCallDelta(index=1, arguments='{"tz": '), pb.ToolCallDelta(index=0, arguments='{"city": "Oslo"}')],
        [pb.ToolCallDelta(index=1, arguments='"CET"}')],
    ]
    messages = [pb.GenerateResponse(tool_call_deltas=d) for d in deltas]
    messages[-1].finish_reason = pb.FINISH_REASON_TOOL_CALLS
    calls = collect(proto.generation_chunk(m) for m in messages).tool_calls
    assert calls == [
        ToolCall("a", "get_weather", '{"city": "Oslo"}', 0),
        ToolCall("b", "get_time", '{"tz": "CET"}', 1),
    ]


def test_choices_keep_their_own_calls_and_reasoning() -> None:
    messages = [
        pb.GenerateResponse(index=1, reasoning_text="r1", tool_calls=[pb.ToolCall(id="x", name="f", arguments="{}")]),
        pb.GenerateResponse(index=0, text="plain", finish_reason=pb.FINISH_REASON_STOP),
    ]
    completion = collect(proto.generation_chunk(m) for m in messages)
    assert completion.tool_calls == [] and completion.reasoning_text == ""
    assert completion.choices[1].tool_calls[0].name == "f" and completion.choices[1].reasoning_text == "r1"


def test_parsed_arguments_is_a_dict() -> None:
    assert ToolCall("a", "f", '{"city": "Paris", "days": 2}').parsed_arguments() == {"city": "Paris", "days": 2}
    assert ToolCall("a", "f", "").parsed_arguments() == {}


@pytest.mark.parametrize("arguments", ["[1, 2]", '{"city": '])
def test_parsed_arguments_that_are_not_an_object_raise_value_error(arguments: str) -> None:
    with pytest.raises(ValueError):
        ToolCall("a", "f", arguments).parsed_arguments()


def test_tool_call_to_dict_is_openais_shape() -> None:
    assert ToolCall("a", "f", "{}", 0).to_dict() == {
        "id": "a",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }


def test_choice_built_the_old_way_has_no_calls_or_reasoning() -> None:
    choice = Choice(0, "text", [1], "stop", None, None, [], None)
    assert choice.tool_calls == [] and choice.reasoning_text == ""


def _sent_options() -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "chat_template_kwargs": {"enable_thinking": True},
        "logit_bias": {"5": 1.0},
        "max_tokens": 32,
    }


def _assert_sent(request: pb.GenerateRequest) -> None:
    assert [t.name for t in request.tools] == ["get_weather"]
    assert request.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED
    assert request.chat_template_kwargs == '{"enable_thinking": true}'
    assert dict(request.sampling_params.logit_bias) == {5: 1.0} and request.sampling_params.max_tokens == 32


def test_sync_client_sends_tools_and_returns_the_calls(
    scripted_server: Any, tool_call_replies: list[pb.GenerateResponse]
) -> None:
    scripted_server.replies = tool_call_replies
    with WeirClient(scripted_server.target, timeout=10) as client:
        completion = client.complete(**_sent_options())
    _assert_sent(scripted_server.requests[0])
    assert completion.tool_calls[0].parsed_arguments() == {"city": "Paris"}
    assert completion.reasoning_text == "The user wants the weather."


async def test_async_client_sends_tools_and_returns_the_calls(
    scripted_server: Any, tool_call_replies: list[pb.GenerateResponse]
) -> None:
    scripted_server.replies = tool_call_replies
    async with AsyncWeirClient(scripted_server.target, timeout=10) as client:
        completion = await client.complete(**_sent_options())
        chunks = [c async for c in client.generate(**_sent_options())]
    _assert_sent(scripted_server.requests[0])
    assert completion.tool_calls[0].parsed_arguments() == {"city": "Paris"}
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].tool_calls == completion.tool_calls
