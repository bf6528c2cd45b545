"""Tool calling and reasoning through the gateway: what reaches the server, and what the official openai SDK makes
of the server's calls, streaming and not (the fake backend calls tools as a server-side parser tells them)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from gateway_fakes import GEN_MODEL, call_arguments
from gateway_support import RunningGateway, http
from pydantic import BaseModel

from weir.v1 import inference_pb2 as pb

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Today's weather",
                                            "parameters": WEATHER_PARAMETERS}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "clock"}}
USER = {"role": "user", "content": "What is the weather in Paris?"}


class Weather(BaseModel):
    """Today's weather in a city (a strict tool, which the SDK's stream helper parses)."""

    city: str
    choice: int
    call: int


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def sent(fake) -> pb.GenerateRequest:
    return fake.servicer.requests[-1]


def chat(gateway: RunningGateway, **fields: Any):
    body = {"model": GEN_MODEL, "messages": [USER], "max_tokens": 4} | fields
    return http("POST", gateway.url + "/v1/chat/completions", body)


# ---- requests: what the server receives ----------------------------------------------------------------------


def test_tools_without_tool_choice_are_sent_with_choice_auto(client: openai.OpenAI, fake) -> None:
    client.chat.completions.create(model=GEN_MODEL, messages=[USER], tools=[WEATHER, CLOCK])
    request = sent(fake)
    assert [(t.name, t.description) for t in request.tools] == [("weather", "Today's weather"), ("clock", "")]
    assert json.loads(request.tools[0].parameters) == WEATHER_PARAMETERS and request.tools[1].parameters == ""
    assert request.tool_choice.mode == pb.TOOL_CHOICE_MODE_AUTO


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO)),
        ("none", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)),
        ("required", pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
        ({"type": "function", "function": {"name": "clock"}}, pb.ToolChoice(function="clock")),
    ],
)
def test_tool_choice_maps_to_the_proto(gateway: RunningGateway, fake, choice: Any, expected: pb.ToolChoice) -> None:
    assert chat(gateway, tools=[WEATHER, CLOCK], tool_choice=choice).status == 200
    assert sent(fake).tool_choice == expected


def test_without_tools_no_tool_fields_are_sent(gateway: RunningGateway, fake) -> None:
    assert chat(gateway, tool_choice="none", parallel_tool_calls=False).status == 200
    assert not sent(fake).tools and not sent(fake).HasField("tool_choice")
    assert not sent(fake).HasField("parallel_tool_calls")


@pytest.mark.parametrize("parallel", [False, True])
def test_parallel_tool_calls_is_forwarded_for_the_server_to_enforce(
    client: openai.OpenAI, fake, parallel: bool
) -> None:
    args = {"model": GEN_MODEL, "messages": [USER], "tools": [WEATHER, CLOCK]}
    client.chat.completions.create(**args, parallel_tool_calls=parallel)
    assert sent(fake).HasField("parallel_tool_calls") and sent(fake).parallel_tool_calls is parallel
    with client.chat.completions.stream(**args, parallel_tool_calls=parallel) as stream:
        stream.get_final_completion()
    assert sent(fake).HasField("parallel_tool_calls") and sent(fake).parallel_tool_calls is parallel


def test_parallel_tool_calls_omitted_is_left_to_the_server(client: openai.OpenAI, fake) -> None:
    client.chat.completions.create(model=GEN_MODEL, messages=[USER], tools=[WEATHER])
    assert not sent(fake).HasField("parallel_tool_calls")


def test_every_call_the_server_makes_reaches_the_client(client: openai.OpenAI) -> None:
    """The server alone decides how many calls a choice holds (parallel_tool_calls included): none is dropped."""
    args = {"model": GEN_MODEL, "messages": [{"role": "user", "content": "CALL2"}], "tools": [WEATHER, CLOCK]}
    whole = client.chat.completions.create(**args, parallel_tool_calls=False)
    assert [c.function.name for c in whole.choices[0].message.tool_calls] == ["weather", "clock"]
    with client.chat.completions.stream(**args, parallel_tool_calls=False) as stream:
        streamed = stream.get_final_completion()
    assert [c.function.name for c in streamed.choices[0].message.tool_calls] == ["weather", "clock"]


def test_a_tool_loop_history_reaches_the_server_turn_by_turn(client: openai.OpenAI, fake) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "name": "ada",
            "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "?"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client.chat.completions.create(model=GEN_MODEL, messages=messages, tools=[WEATHER], max_tokens=2)
    turns = sent(fake).messages.messages
    assert [t.role for t in turns] == ["system", "user", "assistant", "tool"]
    assert turns[1].name == "ada" and [p.text for p in turns[1].content_parts] == ["Weather", "?"]
    assert turns[2].content == "" and list(turns[2].tool_calls) == [
        pb.ToolCall(id="call_1", name="weather", arguments='{"city": "Paris"}', index=0)
    ]
    assert turns[3].tool_call_id == "call_1" and turns[3].content == "sunny"


def test_chat_template_kwargs_and_logit_bias_are_forwarded(client: openai.OpenAI, fake) -> None:
    client.chat.completions.create(
        model=GEN_MODEL, messages=[USER], max_tokens=2, logit_bias={"7": -100, "12": 2.5},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    request = sent(fake)
    assert json.loads(request.chat_template_kwargs) == {"enable_thinking": False}
    assert dict(request.sampling_params.logit_bias) == {7: -100.0, 12: 2.5}


def test_completions_forward_logit_bias(client: openai.OpenAI, fake) -> None:
    client.completions.create(model=GEN_MODEL, prompt="hi", max_tokens=2, logit_bias={"3": 100})
    assert dict(sent(fake).sampling_params.logit_bias) == {3: 100.0}


@pytest.mark.parametrize(
    ("server_field", "body_field"),
    [
        ("tools[0].parameters", "tools[0].function.parameters"),
        ("tools[1].name", "tools[1].function.name"),
        ("messages[2].tool_calls[0].arguments", "messages[2].tool_calls[0].function.arguments"),
        ("messages[3].tool_call_id", "messages[3].tool_call_id"),
        ("messages[1].content_parts[0]", "messages[1].content[0]"),
        ("tool_choice.function", "tool_choice"),
        ("chat_template_kwargs", "chat_template_kwargs"),
        ("sampling_params.logit_bias", "logit_bias"),
    ],
)
def test_server_field_names_become_body_field_names(
    gateway: RunningGateway, server_field: str, body_field: str
) -> None:
    reply = chat(gateway, messages=[{"role": "user", "content": f"FAIL_FIELD={server_field}"}])
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["param"] == body_field and error["message"].startswith(f"{body_field}:")


# ---- responses: what the SDK makes of the server's calls ------------------------------------------------------


def test_a_call_is_a_tool_calls_message_with_null_content(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=GEN_MODEL, messages=[USER], tools=[WEATHER])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.role == "assistant"
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call-0-0", "function", "weather")
    assert call.function.arguments == call_arguments(0, 0)


def test_parallel_calls_keep_their_order_in_each_choice(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=GEN_MODEL, messages=[{"role": "user", "content": "CALL2"}], tools=[WEATHER, CLOCK], n=2
    )
    for choice in completion.choices:
        calls = choice.message.tool_calls
        assert [c.function.name for c in calls] == ["weather", "clock"]
        assert [c.function.arguments for c in calls] == [call_arguments(choice.index, k) for k in (0, 1)]
        assert [c.id for c in calls] == [f"call-{choice.index}-0", f"call-{choice.index}-1"]


@pytest.mark.parametrize("words", ["", "CALL2", "FINAL_ONLY", "CALL2 FINAL_ONLY", "SAY_FIRST THINK"])
def test_streamed_calls_accumulate_in_the_sdk_as_the_whole_answer_does(client: openai.OpenAI, words: str) -> None:
    strict = openai.pydantic_function_tool(Weather, name="weather")
    args = {"model": GEN_MODEL, "messages": [{"role": "user", "content": words or "hi"}], "tools": [strict, CLOCK]}
    whole = client.chat.completions.create(**args).choices[0]
    with client.chat.completions.stream(**args) as stream:
        events = [event.type for event in stream]
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    assert streamed.message.content == (whole.message.content or "")  # the role chunk opens content with ""
    assert [
        c.model_dump(exclude={"index": True, "function": {"parsed_arguments"}}) for c in streamed.message.tool_calls
    ] == [c.model_dump() for c in whole.message.tool_calls]
    weather = streamed.message.tool_calls[0].function
    assert weather.parsed_arguments == Weather(city="Paris", choice=0, call=0)
    assert events.count("tool_calls.function.arguments.done") == len(whole.message.tool_calls)


def test_stream_tells_id_and_name_once_then_argument_fragments(gateway: RunningGateway) -> None:
    reply = chat(gateway, tools=[WEATHER], stream=True)
    events = [json.loads(line[6:]) for line in reply.body.decode().split("\n\n") if line.startswith("data: {")]
    entries = [e for event in events for choice in event["choices"] for e in choice["delta"].get("tool_calls", [])]
    assert entries[0] == {"index": 0, "id": "call-0-0", "type": "function",
                          "function": {"name": "weather", "arguments": ""}}  # fmt: skip
    assert all(set(e) == {"index", "function"} and set(e["function"]) == {"arguments"} for e in entries[1:])
    assert "".join(e["function"]["arguments"] for e in entries) == call_arguments(0, 0)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_calls_without_server_ids_get_one_id_each_streaming_or_not(client: openai.OpenAI) -> None:
    args = {"model": GEN_MODEL, "messages": [{"role": "user", "content": "CALL2 NO_IDS"}], "tools": [WEATHER, CLOCK]}
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**args, stream=True))
    ids = [c.id for chunk in chunks for d in chunk.choices for c in d.delta.tool_calls or [] if c.id]
    assert len(ids) == 2 and all(i.startswith("call_") for i in ids) and ids[0] != ids[1]
    assert len({c.id for c in whole}) == 2 and all(c.id.startswith("call_") for c in whole)


def test_reasoning_is_reasoning_content_not_content(client: openai.OpenAI) -> None:
    args = {"model": GEN_MODEL, "messages": [{"role": "user", "content": "THINK"}], "max_tokens": 4}
    message = client.chat.completions.create(**args).choices[0].message
    assert message.content == " c0t2 c0t3"
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == " c0t0 c0t1"
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(**args, stream=True)]
    assert "".join(d.content or "" for d in deltas) == message.content
    for name in ("reasoning_content", "reasoning"):
        assert "".join((d.model_extra or {}).get(name, "") for d in deltas) == " c0t0 c0t1"


def test_reasoning_and_text_before_a_call_keep_their_places(client: openai.OpenAI) -> None:
    args = {"model": GEN_MODEL, "messages": [{"role": "user", "content": "THINK SAY_FIRST"}], "tools": [WEATHER]}
    message = client.chat.completions.create(**args).choices[0].message
    assert message.content == "Let me look. " and message.model_extra["reasoning_content"] == "Paris is a city. "
    assert message.tool_calls[0].function.arguments == call_arguments(0, 0)


def test_a_tool_loop_through_the_sdk(client: openai.OpenAI, fake) -> None:
    """A forced call, its result sent back, then a turn with tool_choice omitted."""
    messages: list[Any] = [USER]
    forced = {"type": "function", "function": {"name": "weather"}}
    first = client.chat.completions.create(model=GEN_MODEL, messages=messages, tools=[WEATHER], tool_choice=forced)
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    second = client.chat.completions.create(model=GEN_MODEL, messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "tool_calls"
    request = sent(fake)
    assert request.tool_choice.mode == pb.TOOL_CHOICE_MODE_AUTO
    assert [t.role for t in request.messages.messages] == ["user", "assistant", "tool"]
    assert request.messages.messages[2].tool_call_id == call.id == "call-0-0"


@pytest.mark.parametrize(
    ("tool_choice", "mode"),
    [(None, pb.TOOL_CHOICE_MODE_AUTO), ("auto", pb.TOOL_CHOICE_MODE_AUTO), ("none", pb.TOOL_CHOICE_MODE_NONE),
     ("required", pb.TOOL_CHOICE_MODE_REQUIRED)],
)  # fmt: skip
def test_an_output_constraint_goes_with_tools_to_the_server(
    gateway: RunningGateway, fake, tool_choice: str | None, mode: int
) -> None:
    """The server makes the output calls or text of the constraint's shape (moot when a call is required)."""
    reply = chat(gateway, tools=[WEATHER], tool_choice=tool_choice, response_format={"type": "json_object"})
    assert reply.status == 200, reply.json()
    assert sent(fake).json_object and [t.name for t in sent(fake).tools] == ["weather"]
    assert sent(fake).tool_choice.mode == mode


def test_a_vllm_guided_constraint_goes_with_tools_to_the_server(gateway: RunningGateway, fake) -> None:
    assert chat(gateway, tools=[WEATHER], guided_regex="[a-z]+").status == 200
    assert sent(fake).regex == "[a-z]+" and sent(fake).tool_choice.mode == pb.TOOL_CHOICE_MODE_AUTO
