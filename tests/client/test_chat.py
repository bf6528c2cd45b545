"""generate()'s OpenAI-shaped keywords as weir.v1 request fields: messages, tools, tool_choice, template variables,
constraints and logit_bias; shapes the proto cannot take raise WeirClientError naming the keyword at fault."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from weir.v1 import inference_pb2 as pb
from weir_client import ToolCall, WeirClientError
from weir_client import _protocol as proto

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _request(messages: list[dict[str, Any]] | None = None, **options: Any) -> pb.GenerateRequest:
    messages = [{"role": "user", "content": "Hi"}] if messages is None else messages
    return proto.generate_request(None, messages, None, "", "", True, options)  # type: ignore[arg-type]


def _field_error(messages: list[dict[str, Any]] | None = None, **options: Any) -> str | None:
    with pytest.raises(WeirClientError) as info:
        _request(messages, **options)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.field


# ---- messages --------------------------------------------------------------------------------------------------


def test_text_parts_become_content_parts() -> None:
    content = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    message = _request([{"role": "user", "content": content}]).messages.messages[0]
    assert [p.text for p in message.content_parts] == ["first", "second"]
    assert message.content == ""


def test_assistant_tool_calls_take_arguments_as_text_or_dict() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}},
    ]
    message = _request([{"role": "assistant", "content": None, "tool_calls": calls}]).messages.messages[0]
    assert [(c.id, c.name, c.index) for c in message.tool_calls] == [("a", "get_weather", 0), ("b", "get_time", 1)]
    assert message.tool_calls[0].arguments == '{"city": "Paris"}'
    assert json.loads(message.tool_calls[1].arguments) == {"tz": "CET"}
    assert message.content == "" and not message.content_parts


def test_tool_calls_without_the_function_level_and_without_arguments() -> None:
    message = _request([{"role": "assistant", "tool_calls": [{"id": "a", "name": "ping"}]}]).messages.messages[0]
    assert (message.tool_calls[0].name, message.tool_calls[0].arguments) == ("ping", "{}")


def test_tool_calls_returned_by_the_client_can_be_sent_back() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    for entry in (call, call.to_dict()):
        message = _request([{"role": "assistant", "tool_calls": [entry]}]).messages.messages[0]
        assert message.tool_calls[0] == pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')


def test_tool_result_carries_tool_call_id_and_name() -> None:
    turn = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18C"}
    message = _request([turn]).messages.messages[0]
    assert (message.role, message.tool_call_id, message.name, message.content) == (
        "tool",
        "call_1",
        "get_weather",
        "18C",
    )


def test_keys_the_proto_lacks_are_left_out() -> None:
    message = _request([{"role": "assistant", "content": "Hi", "refusal": None}]).messages.messages[0]
    assert (message.role, message.content) == ("assistant", "Hi")


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"content": "Hi"}], "messages[0].role"),
        (["Hi"], "messages[0]"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": 7}], "messages[1].tool_call_id"),
        (
            [{"role": "assistant", "tool_calls": [{"id": "a", "function": {}}]}],
            "messages[0].tool_calls[0].function.name",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": 3}}]}],
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_malformed_messages_name_the_field(messages: list[Any], field: str) -> None:
    assert _field_error(messages) == field


# ---- tools, tool_choice, chat_template_kwargs ------------------------------------------------------------------


def test_openai_and_flat_tools_are_the_same_tool() -> None:
    function = {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER_PARAMETERS}
    openai_shape = _request(tools=[{"type": "function", "function": function}]).tools
    flat = _request(tools=[function]).tools
    assert openai_shape == flat
    assert (flat[0].name, flat[0].description) == ("get_weather", "Weather of a city")
    assert json.loads(flat[0].parameters) == WEATHER_PARAMETERS


def test_tool_parameters_may_be_json_text_or_absent() -> None:
    tools = _request(tools=[{"name": "a", "parameters": '{"type": "object"}'}, {"name": "b"}]).tools
    assert [t.parameters for t in tools] == ['{"type": "object"}', ""]


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
        ([{"name": "a"}, {"type": "retrieval"}], "tools[1].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"name": "a", "parameters": {"default": object()}}], "tools[0].parameters"),
        (["get_weather"], "tools[0]"),
    ],
)
def test_malformed_tools_name_the_field(tools: list[Any], field: str) -> None:
    assert _field_error(tools=tools) == field


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO)),
        ("none", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)),
        ("required", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
        ("get_weather", pb.ToolChoice(function="get_weather")),
        ({"type": "function", "function": {"name": "auto"}}, pb.ToolChoice(function="auto")),
        ({"name": "get_weather"}, pb.ToolChoice(function="get_weather")),
    ],
)
def test_tool_choice_shapes(choice: Any, expected: pb.ToolChoice) -> None:
    assert _request(tool_choice=choice).tool_choice == expected


@pytest.mark.parametrize("choice", ["", {"type": "function"}, 3])
def test_malformed_tool_choice_is_refused(choice: Any) -> None:
    assert _field_error(tool_choice=choice) == "tool_choice"


def test_options_left_out_stay_unset() -> None:
    request = _request()
    assert not request.tools and not request.HasField("tool_choice") and request.chat_template_kwargs == ""
    assert request.WhichOneof("constraint") is None and not request.sampling_params.logit_bias


def test_chat_template_kwargs_are_sent_as_json_text() -> None:
    request = _request(chat_template_kwargs={"enable_thinking": False})
    assert json.loads(request.chat_template_kwargs) == {"enable_thinking": False}
    assert _field_error(chat_template_kwargs=["enable_thinking"]) == "chat_template_kwargs"


# ---- constraints -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "kind", "value"),
    [
        ({"json_schema": WEATHER_PARAMETERS}, "json_schema", json.dumps(WEATHER_PARAMETERS)),
        ({"json_schema": '{"type": "object"}'}, "json_schema", '{"type": "object"}'),
        ({"json_object": True}, "json_object", True),
        ({"regex": r"\d+"}, "regex", r"\d+"),
        ({"grammar": 'root ::= "yes" | "no"'}, "grammar", 'root ::= "yes" | "no"'),
    ],
)
def test_one_constraint_sets_the_oneof(options: dict[str, Any], kind: str, value: Any) -> None:
    request = _request(**options)
    assert request.WhichOneof("constraint") == kind
    assert getattr(request, kind) == value


def test_choice_constraint_is_a_string_list() -> None:
    request = _request(choice=["yes", "no"])
    assert request.WhichOneof("constraint") == "choice" and list(request.choice.values) == ["yes", "no"]


def test_json_object_false_is_no_constraint() -> None:
    assert _request(json_object=False, regex="a+").WhichOneof("constraint") == "regex"


def test_two_constraints_are_a_client_side_error() -> None:
    with pytest.raises(WeirClientError) as info:
        _request(regex="a+", choice=["a"])
    assert info.value.field == "constraint"
    assert "regex" in info.value.message and "choice" in info.value.message


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"choice": "yes"}, "choice"),
        ({"choice": ["a", 1]}, "choice"),
        ({"regex": 3}, "regex"),
        ({"json_schema": 1}, "json_schema"),
    ],
)
def test_constraint_of_the_wrong_type_names_it(options: dict[str, Any], field: str) -> None:
    assert _field_error(**options) == field


def test_constraints_apply_to_prompts_too() -> None:
    request = proto.generate_request("Answer:", None, None, "", "", True, {"choice": ["yes", "no"], "max_tokens": 2})
    assert request.prompt == "Answer:" and list(request.choice.values) == ["yes", "no"]
    assert request.sampling_params.max_tokens == 2


# ---- logit_bias ------------------------------------------------------------------------------------------------


def test_logit_bias_takes_int_or_digit_string_keys() -> None:
    params = proto.sampling_params({"logit_bias": {"50256": -100, 7: 2.5}})
    assert dict(params.logit_bias) == {50256: -100.0, 7: 2.5}


@pytest.mark.parametrize("bias", [{"eos": 1.0}, {1.5: 1.0}, {True: 1.0}, {1: "high"}, [1, 2]])
def test_malformed_logit_bias_names_the_field(bias: Any) -> None:
    with pytest.raises(WeirClientError) as info:
        proto.sampling_params({"logit_bias": bias})
    assert info.value.field == "sampling_params.logit_bias"
