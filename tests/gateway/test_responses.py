"""POST /v1/responses through the official openai SDK, over a fake backend that answers as a server with tool-call
and reasoning parsers does; GET and DELETE of stored responses; 400s naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest
from gateway_fakes import GEN_MODEL, BackgroundLoop, FakeInference, FakeServer
from gateway_support import RunningGateway, http, start_gateway

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.responses import RESPONSES_REQUEST_SCHEMA, body_param

ANSWER = ["Hello", " from", " Weir"]
REASONING = ["Let me", " think."]
ARGUMENTS = ['{"city": ', '"Paris"}']
CALL_ID = "call_fake0"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TEXT_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    *["response.output_text.delta"] * len(ANSWER), "response.output_text.done", "response.content_part.done",
    "response.output_item.done", "response.completed",
]  # fmt: skip


# ---- a backend with a tool-call and a reasoning parser -----------------------------------------------------


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ResponsesInference(FakeInference):
    """Calls a function when tool_choice requires one (id and name first, then argument pieces, the complete call
    last, finish TOOL_CALLS); reasons first when the last turn says THINK; else answers ANSWER and stops, or runs
    out of max_tokens (LENGTH). FAIL_MIDWAY fails after the first piece."""

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        self.requests.append(request)
        turns = request.messages.messages
        last = turns[-1].content if turns else ""
        if "FAIL_INVALID" in last:  # as the server refuses a prompt that leaves no room for the output
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "sampling_params.max_tokens: too many for the context"
            )
        prompt_tokens = sum(len(t.content.split()) + 1 for t in turns)
        model = request.model or GEN_MODEL
        choice = request.tool_choice
        if request.tools and (choice.function or choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED):
            name = choice.function or request.tools[0].name
            calls = [pb.ToolCall(id=f"call_fake{i}", name=name, arguments="".join(ARGUMENTS), index=i)
                     for i in range(2 if "TWO CALLS" in last else 1)]  # fmt: skip
            for call in calls:
                yield pb.GenerateResponse(model=model, tool_call_deltas=[pb.ToolCallDelta(index=call.index, id=call.id,
                                                                                          name=name)])  # fmt: skip
                for piece in ARGUMENTS:
                    delta = pb.ToolCallDelta(index=call.index, arguments=piece)
                    yield pb.GenerateResponse(model=model, tool_call_deltas=[delta])
            rambles = "RAMBLE" in last  # text after the call, until max_tokens runs out
            end = pb.GenerateResponse(model=model, text="<tool_call>" if rambles else "", tool_calls=calls,
                                      finish_reason=pb.FINISH_REASON_LENGTH if rambles else pb.FINISH_REASON_TOOL_CALLS,
                                      usage=_usage(prompt_tokens, len(ARGUMENTS)))  # fmt: skip
            yield end
            return
        pieces = [("reasoning_text", r) for r in REASONING] if "THINK" in last else []
        pieces += [("text", t) for t in ANSWER]
        max_tokens = request.sampling_params.max_tokens
        sent = pieces[:max_tokens]
        for step, (kind, piece) in enumerate(sent):
            if "FAIL_MIDWAY" in last and step == 1:
                await context.abort(grpc.StatusCode.INTERNAL, "the engine fell over")
            message = pb.GenerateResponse(model=model, **{kind: piece})
            if step == len(sent) - 1:
                message.finish_reason = pb.FINISH_REASON_STOP if sent == pieces else pb.FINISH_REASON_LENGTH
                message.usage.CopyFrom(_usage(prompt_tokens, len(sent)))
            yield message


@pytest.fixture(scope="module")
def backend(background: BackgroundLoop) -> Iterator[FakeServer]:
    server = FakeServer()
    server.servicer = ResponsesInference()
    background.run(server.start())
    yield server
    background.run(server.stop())


@pytest.fixture(scope="module")
def gateway(background: BackgroundLoop, backend: FakeServer) -> Iterator[RunningGateway]:
    running = background.run(start_gateway(GatewayConfig(backends=(backend.address,), max_tokens=64)))
    yield running
    background.run(running.runner.cleanup())


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def last_request(backend: FakeServer) -> pb.GenerateRequest:
    return backend.servicer.requests[-1]


def turns(request: pb.GenerateRequest) -> list[tuple[str, str]]:
    return [(t.role, t.content) for t in request.messages.messages]


# ---- text ------------------------------------------------------------------------------------------------------


def test_text_answer_is_one_message_item(client: openai.OpenAI, backend: FakeServer) -> None:
    response = client.responses.create(model=GEN_MODEL, input="Say hello")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.error is None and response.incomplete_details is None
    assert response.output_text == "".join(ANSWER)
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_")
    assert [(c.type, c.annotations) for c in message.content] == [("output_text", [])]
    assert response.usage.output_tokens == len(ANSWER)
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert turns(last_request(backend)) == [("user", "Say hello")]


def test_instructions_open_the_conversation_as_a_system_turn(client: openai.OpenAI, backend: FakeServer) -> None:
    response = client.responses.create(model=GEN_MODEL, instructions="Be brief.", input="Hi")
    assert turns(last_request(backend)) == [("system", "Be brief."), ("user", "Hi")]
    assert response.instructions == "Be brief."


def test_message_items_with_text_parts_and_developer_role(client: openai.OpenAI, backend: FakeServer) -> None:
    client.responses.create(
        model=GEN_MODEL,
        input=[
            {"role": "developer", "content": "Rules."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                             {"type": "input_text", "text": "b"}]},
        ],
    )  # fmt: skip
    assert turns(last_request(backend)) == [("system", "Rules."), ("user", "a\nb")]


def test_request_settings_are_echoed(client: openai.OpenAI, backend: FakeServer) -> None:
    response = client.responses.create(
        model=GEN_MODEL, input="x", temperature=0.5, top_p=0.9, max_output_tokens=10, metadata={"team": "a"},
        reasoning={"effort": "low"}, user="u1",
    )  # fmt: skip
    params = last_request(backend).sampling_params
    assert (params.temperature, round(params.top_p, 3), params.max_tokens) == (0.5, 0.9, 10)
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.5, 0.9, 10)
    assert response.metadata == {"team": "a"} and response.user == "u1" and response.reasoning.effort == "low"
    assert response.store is True and response.tool_choice == "auto" and response.tools == []
    assert response.text.format.type == "text" and response.parallel_tool_calls is True


def test_running_out_of_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=GEN_MODEL, input="x", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "".join(ANSWER[:2])
    assert response.output[0].status == "incomplete"


def test_json_schema_format_becomes_the_constraint(client: openai.OpenAI, backend: FakeServer) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    response = client.responses.create(model=GEN_MODEL, input="x", text=text)
    assert json.loads(last_request(backend).json_schema) == schema
    assert response.text.format.type == "json_schema" and response.text.format.name == "thing"
    client.responses.create(model=GEN_MODEL, input="x", text={"format": {"type": "json_object"}})
    assert last_request(backend).WhichOneof("constraint") == "json_object"
    client.responses.create(model=GEN_MODEL, input="x", text={"format": {"type": "text"}})
    assert last_request(backend).WhichOneof("constraint") is None


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_a_text_format_goes_with_tools_to_the_server(
    client: openai.OpenAI, backend: FakeServer, tool_choice: str
) -> None:
    """The server makes the output calls or text of the format's shape (moot when a call is required)."""
    text = {"format": {"type": "json_schema", "name": "thing", "schema": {"type": "object"}}}
    response = client.responses.create(model=GEN_MODEL, input="x", tools=[WEATHER], tool_choice=tool_choice,
                                       text=text)  # fmt: skip
    request = last_request(backend)
    assert json.loads(request.json_schema) == {"type": "object"} and [t.name for t in request.tools] == ["get_weather"]
    assert response.text.format.type == "json_schema" and response.tool_choice == tool_choice


# ---- streaming -----------------------------------------------------------------------------------------------


def test_stream_events_come_in_order_with_increasing_sequence_numbers(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=GEN_MODEL, input="x", stream=True))
    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, added, deltas = events[0], events[2], events[4 : 4 + len(ANSWER)]
    assert created.response.status == "in_progress" and created.response.output == []
    assert added.item.type == "message" and added.item.content == [] and added.output_index == 0
    assert [d.delta for d in deltas] == ANSWER and {d.item_id for d in deltas} == {added.item.id}
    assert events[-1].response.output_text == "".join(ANSWER)
    assert events[-1].response.id == created.response.id


def test_stream_helper_accumulates_the_response_create_returns(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=GEN_MODEL, input="THINK first")
    with client.responses.stream(model=GEN_MODEL, input="THINK first") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == whole.output_text
    assert [i.type for i in final.output] == [i.type for i in whole.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == whole.output[0].content[0].text == "".join(REASONING)
    assert final.usage == whole.usage and final.status == whole.status


def test_reasoning_streams_as_its_own_item_before_the_message(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=GEN_MODEL, input="THINK", stream=True))
    kinds = [e.type for e in events]
    assert kinds[2:8] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
    ]  # fmt: skip
    assert kinds[8] == "response.output_item.done" and events[8].item.type == "reasoning"
    assert kinds[9] == "response.output_item.added" and events[9].item.type == "message" and events[9].output_index == 1
    assert events[-1].response.output[0].content[0].text == "".join(REASONING)


def test_raw_stream_has_named_events_and_no_done_marker(gateway: RunningGateway) -> None:
    reply = http("POST", gateway.url + "/v1/responses", {"model": GEN_MODEL, "input": "x", "stream": True})
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    blocks = reply.body.decode().strip().split("\n\n")
    assert blocks[0].startswith("event: response.created\ndata: {")
    for block in blocks:
        name, data = block.split("\n")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")
    assert "[DONE]" not in reply.body.decode()


def test_failure_after_the_stream_started_is_an_error_event(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=GEN_MODEL, input="FAIL_MIDWAY", stream=True))
    assert events[-1].type == "error" and "fell over" in events[-1].message
    assert events[-1].sequence_number == len(events) - 1
    assert "response.completed" not in [e.type for e in events]


# ---- function calls ------------------------------------------------------------------------------------------


def test_required_tool_choice_returns_a_function_call_item(client: openai.OpenAI, backend: FakeServer) -> None:
    response = client.responses.create(model=GEN_MODEL, input="Weather in Paris?", tools=[WEATHER],
                                       tool_choice="required")  # fmt: skip
    [call] = response.output
    assert call.type == "function_call" and call.id.startswith("fc_") and call.status == "completed"
    assert (call.call_id, call.name, json.loads(call.arguments)) == (CALL_ID, "get_weather", {"city": "Paris"})
    assert response.output_text == "" and response.tool_choice == "required"
    assert response.tools[0].name == "get_weather" and response.tools[0].strict is True
    sent = last_request(backend)
    assert sent.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED
    assert [(t.name, json.loads(t.parameters)) for t in sent.tools] == [("get_weather", WEATHER["parameters"])]


def test_a_complete_call_stays_completed_when_text_after_it_runs_out(client: openai.OpenAI) -> None:
    response = client.responses.create(model=GEN_MODEL, input="RAMBLE", tools=[WEATHER], tool_choice="required")
    assert response.status == "incomplete"
    assert [(i.type, i.status) for i in response.output] == [("function_call", "completed"), ("message", "incomplete")]


def test_named_tool_choice_is_sent_as_the_function(client: openai.OpenAI, backend: FakeServer) -> None:
    response = client.responses.create(model=GEN_MODEL, input="x", tools=[WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"})  # fmt: skip
    assert last_request(backend).tool_choice.function == "get_weather"
    assert response.tool_choice.name == "get_weather"


def test_function_call_streams_its_arguments(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=GEN_MODEL, input="x", tools=[WEATHER], tool_choice="required",
                                          stream=True))  # fmt: skip
    assert [e.type for e in events[2:]] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    added = events[2].item
    assert (added.type, added.call_id, added.name, added.arguments) == ("function_call", CALL_ID, "get_weather", "")
    assert [e.delta for e in events[3:5]] == ARGUMENTS and events[5].arguments == "".join(ARGUMENTS)
    with client.responses.stream(model=GEN_MODEL, input="x", tools=[WEATHER], tool_choice="required") as stream:
        [call] = stream.get_final_response().output
    assert call.arguments == "".join(ARGUMENTS) and call.call_id == CALL_ID


def test_tool_loop_sends_the_call_and_its_output_back(client: openai.OpenAI, backend: FakeServer) -> None:
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.responses.create(model=GEN_MODEL, input=history, tools=[WEATHER], tool_choice="required")
    history += first.output  # what the SDK docs do: send the output items back as input
    history.append({"type": "function_call_output", "call_id": first.output[0].call_id, "output": "22 C"})
    second = client.responses.create(model=GEN_MODEL, input=history, tools=[WEATHER])
    assert second.output_text == "".join(ANSWER)
    sent = last_request(backend).messages.messages
    assert [t.role for t in sent] == ["user", "assistant", "tool"]
    [call] = sent[1].tool_calls
    assert (call.id, call.name, call.arguments, call.index) == (CALL_ID, "get_weather", "".join(ARGUMENTS), 0)
    assert (sent[2].tool_call_id, sent[2].name, sent[2].content) == (CALL_ID, "get_weather", "22 C")
    assert last_request(backend).tool_choice.mode == pb.TOOL_CHOICE_MODE_AUTO  # tools without a choice: auto


def test_output_sent_back_as_input_drops_the_reasoning(client: openai.OpenAI, backend: FakeServer) -> None:
    first = client.responses.create(model=GEN_MODEL, input="THINK")
    client.responses.create(model=GEN_MODEL, input=[{"role": "user", "content": "THINK"}, *first.output,
                                                    {"role": "user", "content": "again"}])  # fmt: skip
    assert turns(last_request(backend)) == [("user", "THINK"), ("assistant", "".join(ANSWER)), ("user", "again")]


def test_consecutive_function_calls_join_one_assistant_turn(client: openai.OpenAI, backend: FakeServer) -> None:
    calls = [{"type": "function_call", "call_id": f"c{i}", "name": "get_weather", "arguments": '{"city": "X"}'}
             for i in range(2)]  # fmt: skip
    outputs = [{"type": "function_call_output", "call_id": f"c{i}", "output": [{"type": "input_text", "text": "1"}]}
               for i in range(2)]  # fmt: skip
    client.responses.create(model=GEN_MODEL, input=[{"role": "user", "content": "x"}, *calls, *outputs])
    sent = last_request(backend).messages.messages
    assert [t.role for t in sent] == ["user", "assistant", "tool", "tool"]
    assert [(c.id, c.index) for c in sent[1].tool_calls] == [("c0", 0), ("c1", 1)]


# ---- stored responses ----------------------------------------------------------------------------------------


def test_previous_response_id_prepends_the_earlier_turns(client: openai.OpenAI, backend: FakeServer) -> None:
    first = client.responses.create(model=GEN_MODEL, instructions="Old rules.", input="first")
    second = client.responses.create(model=GEN_MODEL, previous_response_id=first.id, input="second")
    # The earlier instructions are not carried over, as in OpenAI's API.
    assert turns(last_request(backend)) == [("user", "first"), ("assistant", "".join(ANSWER)), ("user", "second")]
    assert second.previous_response_id == first.id
    client.responses.create(model=GEN_MODEL, previous_response_id=second.id, input="third", instructions="New.")
    assert turns(last_request(backend))[0] == ("system", "New.") and len(last_request(backend).messages.messages) == 6


def test_tool_result_may_answer_a_call_of_the_previous_response(client: openai.OpenAI, backend: FakeServer) -> None:
    first = client.responses.create(model=GEN_MODEL, input="x", tools=[WEATHER], tool_choice="required")
    result = {"type": "function_call_output", "call_id": CALL_ID, "output": "sunny"}
    client.responses.create(model=GEN_MODEL, previous_response_id=first.id, input=[result], tools=[WEATHER])
    sent = last_request(backend).messages.messages
    assert [t.role for t in sent] == ["user", "assistant", "tool"] and sent[1].tool_calls[0].id == CALL_ID


def test_stored_response_can_be_read_and_deleted(client: openai.OpenAI, gateway: RunningGateway) -> None:
    created = client.responses.create(model=GEN_MODEL, input="x", metadata={"k": "v"})
    assert client.responses.retrieve(created.id).model_dump() == created.model_dump()
    reply = http("DELETE", f"{gateway.url}/v1/responses/{created.id}")
    assert reply.status == 200 and reply.json() == {"id": created.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_streamed_response_is_stored_before_it_completes(client: openai.OpenAI) -> None:
    with client.responses.stream(model=GEN_MODEL, input="x") as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model=GEN_MODEL, input="x", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=GEN_MODEL, input="y", previous_response_id=response.id)
    assert error.value.body["param"] == "previous_response_id"
    assert error.value.body["code"] == "previous_response_not_found"


def test_a_store_of_size_one_forgets_the_older_response(make_gateway, backend: FakeServer) -> None:
    small = make_gateway(GatewayConfig(backends=(backend.address,), response_store_size=1))
    with openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0) as c:
        older = c.responses.create(model=GEN_MODEL, input="x")
        newer = c.responses.create(model=GEN_MODEL, input="y")
        assert c.responses.retrieve(newer.id).id == newer.id
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(older.id)


# ---- refused input -------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "x"}
BAD_REQUESTS = {
    "unsupported_field": ({"input": "x", "background": True}, "background"),
    "built_in_tool": ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    "bad_function_name": ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
    "unknown_call_id": ({"input": [USER, {"type": "function_call_output", "call_id": "nope", "output": "1"}]},
                        "input[1].call_id"),
    "arguments_not_json": ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{x"}]},
                           "input[0].arguments"),
    "arguments_not_an_object": ({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                                            "arguments": "[1]"}]}, "input[0].arguments"),
    "image_input": ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                    "input[0].content[0].type"),
    "unknown_role": ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    "unknown_item": ({"input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type"),
    "tool_choice_unknown_function": ({"input": "x", "tools": [WEATHER],
                                      "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    "tool_choice_required_without_tools": ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    "json_schema_without_schema": ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
                                   "text.format.schema"),
    "unknown_format": ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    "no_input": ({}, "input"),
    "unknown_previous_response": ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    "zero_output_tokens": ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    "too_many_output_tokens": ({"input": "x", "max_output_tokens": 65}, "max_output_tokens"),
    "top_p_zero": ({"input": "x", "top_p": 0}, "top_p"),
    "truncation_auto": ({"input": "x", "truncation": "auto"}, "truncation"),
    "metadata_not_strings": ({"input": "x", "metadata": {"a": 1}}, "metadata.a"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_a_400_naming_the_field(gateway: RunningGateway, name: str) -> None:
    body, param = BAD_REQUESTS[name]
    reply = http("POST", gateway.url + "/v1/responses", {"model": GEN_MODEL, **body})
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"]


def test_server_errors_name_the_body_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=GEN_MODEL, input="FAIL_INVALID")
    assert error.value.body["param"] == "max_output_tokens"
    assert error.value.body["message"].startswith("max_output_tokens:")


@pytest.mark.parametrize(
    ("server", "source", "body"),
    [("max_tokens", None, "max_output_tokens"), ("messages.messages[2].tool_calls[0].arguments", None, "input"),
     ("json_schema", "text.format.schema", "text.format.schema"), ("json_object", "text.format", "text.format"),
     ("tool_choice.function", None, "tool_choice"), ("tools[0].parameters", None, None), ("tool_choice", None, None)],
)  # fmt: skip
def test_server_field_names_map_to_body_field_names(server: str, source: str | None, body: str | None) -> None:
    assert body_param(server, source) == body


def test_unknown_response_id_is_a_404(gateway: RunningGateway) -> None:
    for method in ("GET", "DELETE"):
        reply = http(method, gateway.url + "/v1/responses/resp_missing")
        assert reply.status == 404 and "resp_missing" in reply.json()["error"]["message"]


def test_parallel_calls_get_their_own_items(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": GEN_MODEL, "input": "TWO CALLS", "tools": [WEATHER], "tool_choice": "required"}
    both = client.responses.create(**args)
    assert [(c.type, c.call_id) for c in both.output] == [
        ("function_call", "call_fake0"),
        ("function_call", "call_fake1"),
    ]
    assert len({c.id for c in both.output}) == 2
    with client.responses.stream(**args) as stream:
        events = list(stream)
    assert [e.item.call_id for e in events if e.type == "response.output_item.added"] == ["call_fake0", "call_fake1"]


@pytest.mark.parametrize("parallel", [False, True])
def test_parallel_tool_calls_is_forwarded_for_the_server_to_enforce(
    client: openai.OpenAI, backend: FakeServer, parallel: bool
) -> None:
    args: dict[str, Any] = {"model": GEN_MODEL, "input": "x", "tools": [WEATHER], "parallel_tool_calls": parallel}
    response = client.responses.create(**args)
    assert last_request(backend).HasField("parallel_tool_calls")
    assert last_request(backend).parallel_tool_calls is parallel and response.parallel_tool_calls is parallel
    with client.responses.stream(**args) as stream:
        list(stream)
    assert last_request(backend).parallel_tool_calls is parallel


def test_parallel_tool_calls_omitted_is_left_to_the_server(client: openai.OpenAI, backend: FakeServer) -> None:
    response = client.responses.create(model=GEN_MODEL, input="x", tools=[WEATHER])
    assert not last_request(backend).HasField("parallel_tool_calls") and response.parallel_tool_calls is True


def test_every_call_the_server_makes_becomes_an_item(client: openai.OpenAI) -> None:
    """The server alone decides how many calls there are (parallel_tool_calls included): none is dropped."""
    args: dict[str, Any] = {"model": GEN_MODEL, "input": "TWO CALLS", "tools": [WEATHER], "tool_choice": "required",
                            "parallel_tool_calls": False}  # fmt: skip
    assert [c.call_id for c in client.responses.create(**args).output] == ["call_fake0", "call_fake1"]


def test_vendor_extras_and_ignored_fields_are_accepted(client: openai.OpenAI) -> None:
    response = client.responses.create(model=GEN_MODEL, input=[USER | {"vendor_note": 1}], service_tier="auto",
                                       include=["reasoning.encrypted_content"], extra_body={"top_k": 3})  # fmt: skip
    assert response.status == "completed"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"input": "x", "top_k": 3}, "top_k"), ({"input": "x", "user": "u"}, "user"),
     ({"input": [USER | {"name": "bob"}]}, "input[0].name")],
)  # fmt: skip
def test_strict_gateway_refuses_extras_and_ignored_fields(make_gateway, backend: FakeServer, body, param) -> None:
    strict = make_gateway(GatewayConfig(backends=(backend.address,), strict=True))
    reply = http("POST", strict.url + "/v1/responses", {"model": GEN_MODEL, **body})
    assert reply.status == 400 and reply.json()["error"]["param"] == param


def test_openapi_schema_lists_the_fields_the_handler_reads() -> None:
    properties = RESPONSES_REQUEST_SCHEMA["properties"]
    assert {"model", "input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "stream",
            "store", "previous_response_id", "metadata", "parallel_tool_calls"} <= set(properties)  # fmt: skip
    assert "top_logprobs" not in properties and "top_logprobs" in RESPONSES_REQUEST_SCHEMA["x-weir-refused"]
