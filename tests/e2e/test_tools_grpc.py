"""Tool calling over gRPC with the packaged SmolLM2 (whose template knows no tools: Weir renders them itself and
reads calls back in the Hermes format), each call constrained to its tool's schema."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import grpc
import jsonschema
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 20}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    pb.Tool(name="get_weather", description="Current weather in a city", parameters=json.dumps(WEATHER)),
    pb.Tool(name="get_time", description="Current time in a timezone", parameters=json.dumps(TIME)),
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def chat(turns: list[pb.ChatMessage], max_tokens: int = 64, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=pb.ChatMessages(messages=turns),
        sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0),
        **fields,
    )


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role="user", content=text)


def run(stub: InferenceServiceStub, request: pb.GenerateRequest) -> dict[str, Any]:
    """Text, streamed call arguments by index, the final calls and the finish reason of one choice."""
    text, reasoning, reason = "", "", pb.FINISH_REASON_UNSPECIFIED
    streamed: dict[int, dict[str, str]] = defaultdict(lambda: {"id": "", "name": "", "arguments": ""})
    calls: list[pb.ToolCall] = []
    for message in stub.Generate(request, timeout=300):
        text += message.text
        reasoning += message.reasoning_text
        for delta in message.tool_call_deltas:
            entry = streamed[delta.index]
            if delta.id:
                assert not entry["id"], "a call's id comes once"
                entry["id"], entry["name"] = delta.id, delta.name
            entry["arguments"] += delta.arguments
        calls.extend(message.tool_calls)
        reason = message.finish_reason or reason
    return {"text": text, "reasoning": reasoning, "streamed": dict(streamed), "calls": calls, "reason": reason}


def assert_calls_valid(result: dict[str, Any]) -> None:
    for call in result["calls"]:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        streamed = result["streamed"][call.index]
        assert (streamed["id"], streamed["name"], streamed["arguments"]) == (call.id, call.name, call.arguments)


def bad_field(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return None


def test_named_tool_choice_returns_one_call_that_validates(weir_stub: InferenceServiceStub) -> None:
    request = chat(
        [user("What's the weather in Paris?")], tools=TOOLS, tool_choice=pb.ToolChoice(function="get_weather")
    )
    result = run(weir_stub, request)
    assert result["reason"] == pb.FINISH_REASON_TOOL_CALLS
    assert [c.name for c in result["calls"]] == ["get_weather"]
    assert result["calls"][0].id.startswith("call_")
    assert result["text"].strip() == ""
    assert_calls_valid(result)


def test_required_without_parallel_calls_makes_exactly_one_call(weir_stub: InferenceServiceStub) -> None:
    request = chat(
        [user("What time is it in Tokyo?")],
        tools=TOOLS,
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        parallel_tool_calls=False,
    )
    result = run(weir_stub, request)
    assert result["reason"] == pb.FINISH_REASON_TOOL_CALLS
    assert len(result["calls"]) == 1 and result["calls"][0].name in SCHEMAS
    assert_calls_valid(result)


def test_required_parallel_calls_get_their_own_indexes(weir_stub: InferenceServiceStub) -> None:
    request = chat(
        [user("What time is it in Tokyo, and the weather in Oslo?")],
        max_tokens=96,
        tools=TOOLS,
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
    )
    result = run(weir_stub, request)
    assert result["reason"] in (pb.FINISH_REASON_TOOL_CALLS, pb.FINISH_REASON_LENGTH)
    assert [c.index for c in result["calls"]] == list(range(len(result["calls"])))
    assert len({c.id for c in result["calls"]}) == len(result["calls"]) >= 1
    assert_calls_valid(result)


def test_auto_is_the_default_and_completes(weir_stub: InferenceServiceStub) -> None:
    result = run(weir_stub, chat([user("Say hello.")], tools=TOOLS))
    assert result["reason"] in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_TOOL_CALLS, pb.FINISH_REASON_LENGTH)
    assert result["text"] or result["calls"]
    assert_calls_valid(result)


def test_tool_choice_none_answers_in_text(weir_stub: InferenceServiceStub) -> None:
    request = chat([user("Say hello.")], tools=TOOLS, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE))
    result = run(weir_stub, request)
    assert result["text"] and not result["calls"] and result["reason"] != pb.FINISH_REASON_TOOL_CALLS


def test_a_tool_loop_second_turn_answers(weir_stub: InferenceServiceStub) -> None:
    first = run(
        weir_stub,
        chat([user("What's the weather in Paris?")], tools=TOOLS, tool_choice=pb.ToolChoice(function="get_weather")),
    )
    call = first["calls"][0]
    history = [
        user("What's the weather in Paris?"),
        pb.ChatMessage(role="assistant", tool_calls=[call]),
        pb.ChatMessage(role="tool", tool_call_id=call.id, name=call.name, content='{"temperature": 21}'),
    ]
    second = run(weir_stub, chat(history, tools=TOOLS))
    assert second["reason"] in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_TOOL_CALLS, pb.FINISH_REASON_LENGTH)
    assert second["text"] or second["calls"]
    assert_calls_valid(second)


def test_prompt_carries_the_tools_and_the_history(weir_stub: InferenceServiceStub) -> None:
    history = [
        user("Weather in Oslo?"),
        pb.ChatMessage(
            role="assistant",
            tool_calls=[pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo", "unit": "celsius"}')],
        ),
        pb.ChatMessage(role="tool", tool_call_id="call_1", content="minus four"),
    ]
    request = chat(history, max_tokens=1, tools=TOOLS)
    messages = list(weir_stub.Generate(request, timeout=120))
    detok = weir_stub.Detokenize(
        pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=messages[0].prompt_token_ids)], skip_special_tokens=False)
    )
    prompt = detok.texts[0]
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in prompt
    assert "<tool_response>\nminus four\n</tool_response>" in prompt


def test_content_parts_are_joined(weir_stub: InferenceServiceStub) -> None:
    turn = pb.ChatMessage(role="user", content_parts=[pb.ContentPart(text="Say"), pb.ContentPart(text="hi")])
    messages = list(weir_stub.Generate(chat([turn], max_tokens=1), timeout=120))
    detok = weir_stub.Detokenize(pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=messages[0].prompt_token_ids)]))
    assert "Say\nhi" in detok.texts[0]


@pytest.mark.parametrize(
    ("fields", "turns", "field"),
    [
        ({"tools": [pb.Tool(name="f", parameters='{"type": 12}')]}, None, "tools[0].parameters"),
        ({"tools": [pb.Tool(name="f", parameters="[1, 2]")]}, None, "tools[0].parameters"),
        ({"tools": [pb.Tool(name="f", parameters='{"enum": ["a"]}')]}, None, "tools[0].parameters"),
        ({"tools": [pb.Tool(name="f", parameters="{not json")]}, None, "tools[0].parameters"),
        ({"tools": [pb.Tool(name="bad name!")]}, None, "tools[0].name"),
        ({"tools": TOOLS, "tool_choice": pb.ToolChoice(function="nope")}, None, "tool_choice.function"),
        ({"tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)}, None, "tool_choice"),
        ({"chat_template_kwargs": "[1]"}, None, "chat_template_kwargs"),
        ({"chat_template_kwargs": '{"chat_template": "x"}'}, None, "chat_template_kwargs"),
        ({"tools": TOOLS, "json_schema": "{not json"}, None, "json_schema"),
        ({}, [user("hi"), pb.ChatMessage(role="tool", tool_call_id="call_x", content="1")], "messages[1].tool_call_id"),
        (
            {},
            [user("hi"), pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", name="f", arguments="{x")])],
            "messages[1].tool_calls[0].arguments",
        ),
        (
            {},
            [pb.ChatMessage(role="user", content="a", content_parts=[pb.ContentPart(text="b")])],
            "messages[0].content_parts",
        ),
    ],
)
def test_bad_tool_input_names_the_field(
    weir_stub: InferenceServiceStub, fields: dict[str, Any], turns: list[pb.ChatMessage] | None, field: str
) -> None:
    request = chat(turns or [user("hi")], **fields)
    with pytest.raises(grpc.RpcError) as info:
        list(weir_stub.Generate(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field(info.value) == field
    assert run(weir_stub, chat([user("Still there?")], max_tokens=2))["reason"]  # the server keeps serving


def test_auto_tools_with_a_json_schema_answer_call_or_answer_in_shape(weir_stub: InferenceServiceStub) -> None:
    answer = {
        "type": "object",
        "properties": {"greeting": {"type": "string", "maxLength": 16}},
        "required": ["greeting"],
    }
    result = run(weir_stub, chat([user("Greet me in JSON.")], tools=TOOLS, json_schema=json.dumps(answer)))
    assert_calls_valid(result)
    if not result["calls"]:
        jsonschema.validate(json.loads(result["text"]), answer)


def test_tools_need_messages(weir_stub: InferenceServiceStub) -> None:
    request = pb.GenerateRequest(prompt="hi", tools=TOOLS)
    with pytest.raises(grpc.RpcError) as info:
        list(weir_stub.Generate(request, timeout=60))
    assert bad_field(info.value) == "tools"
