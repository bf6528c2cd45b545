"""Structured output end to end with SmolLM2: gRPC constraints, and the OpenAI SDK through the gateway."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import jsonschema
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from structured_support import ARITHMETIC, SCHEMAS, is_arithmetic, json_prompt

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub

pytestmark = pytest.mark.slow

T = TypeVar("T")
MAX_TOKENS = 96


def in_parallel(calls: list[Callable[[], T]]) -> list[T]:
    """Run the calls at once so the engine batches them (constrained and free rows share batches)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def generate(stub: InferenceServiceStub, request: pb.GenerateRequest) -> tuple[str, int]:
    """The text and finish reason of a one-choice Generate call."""
    text, reason = "", pb.FINISH_REASON_UNSPECIFIED
    for message in stub.Generate(request, timeout=300):
        text += message.text
        reason = message.finish_reason or reason
    return text, reason


def chat_request(messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS, **constraint: Any) -> pb.GenerateRequest:
    turns = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    return pb.GenerateRequest(
        messages=pb.ChatMessages(messages=turns),
        sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0),
        **constraint,
    )


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def bad_field(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return None


@pytest.fixture(scope="module")
def openai_client(gateway_url: str) -> Iterator[openai.OpenAI]:
    """The OpenAI SDK against the real gateway in front of the test server."""
    with openai.OpenAI(base_url=gateway_url, api_key="unused", timeout=300, max_retries=0) as client:
        yield client


def assert_all_valid(outputs: list[tuple[str, Any]]) -> None:
    failures = []
    for (_, schema), (text, reason) in zip(SCHEMAS, outputs, strict=True):
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as error:
            failures.append(f"{text!r} ({reason}): {error}")
    assert not failures, "\n".join(failures)


# ---- gRPC ---------------------------------------------------------------------------------------------------


def test_twenty_json_schemas_over_grpc_all_validate(weir_stub: InferenceServiceStub) -> None:
    requests = [chat_request(json_prompt(subject), json_schema=json.dumps(schema)) for subject, schema in SCHEMAS]
    # A free-text request rides along in the same batches.
    free = chat_request(json_prompt("anything"), max_tokens=24)
    outputs = in_parallel([lambda r=r: generate(weir_stub, r) for r in [*requests, free]])
    assert_all_valid(outputs[:-1])
    assert all(reason == pb.FINISH_REASON_STOP for _, reason in outputs[:-1])
    assert outputs[-1][0]


def test_json_object_gives_an_object(weir_stub: InferenceServiceStub) -> None:
    text, reason = generate(weir_stub, chat_request(json_prompt("a cat's name"), json_object=True))
    assert reason == pb.FINISH_REASON_STOP
    assert isinstance(json.loads(text), dict)


def test_regex_choice_and_grammar_outputs_match(weir_stub: InferenceServiceStub) -> None:
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])"
    sentiments = ["positive", "negative", "neutral"]
    asks = [
        chat_request(json_prompt("today's date"), regex=date),
        chat_request([{"role": "user", "content": "Phone number?"}], regex=r"\(\d{3}\) \d{3}-\d{4}"),
        chat_request([{"role": "user", "content": "I love it! Sentiment?"}], choice=pb.StringList(values=sentiments)),
        chat_request([{"role": "user", "content": "Write a sum."}], grammar=ARITHMETIC),
        chat_request([{"role": "user", "content": "What is 2 times (3 plus 4)?"}], grammar=ARITHMETIC),
    ]
    (day, _), (phone, _), (sentiment, _), (sum_, _), (product, _) = in_parallel(
        [lambda r=r: generate(weir_stub, r) for r in asks]
    )
    assert re.fullmatch(date, day), day
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone), phone
    assert sentiment in sentiments
    assert is_arithmetic(sum_), sum_
    assert is_arithmetic(product), product


def test_unmeetable_constraint_finishes_with_length(weir_stub: InferenceServiceStub) -> None:
    _, schema = SCHEMAS[3]
    text, reason = generate(
        weir_stub, chat_request(json_prompt("a user"), max_tokens=3, json_schema=json.dumps(schema))
    )
    assert reason == pb.FINISH_REASON_LENGTH
    assert text.startswith("{")


@pytest.mark.parametrize(
    ("constraint", "field", "words"),
    [
        ({"json_schema": '{"type": "nope"}'}, "json_schema", "nope"),
        ({"json_schema": "{oops"}, "json_schema", "not valid JSON"),
        ({"regex": "(unclosed"}, "regex", "parenthesis"),
        ({"grammar": 'root ::= "a" |'}, "grammar", "EBNF"),
        ({"choice": pb.StringList()}, "choice", "at least one"),
    ],
)
def test_bad_constraints_are_invalid_argument_and_the_server_serves_on(
    weir_stub: InferenceServiceStub, constraint: dict[str, Any], field: str, words: str
) -> None:
    error = rpc_error(lambda: generate(weir_stub, chat_request(json_prompt("x"), **constraint)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert bad_field(error) == field
    assert words in error.details()  # type: ignore[attr-defined]
    text, _ = generate(weir_stub, chat_request(json_prompt("x"), max_tokens=4, regex="[a-z]{1,4}"))
    assert re.fullmatch("[a-z]{1,4}", text)


# ---- OpenAI SDK through the gateway ----------------------------------------------------------------------------


def test_twenty_schemas_through_response_format_all_validate(openai_client: openai.OpenAI) -> None:
    def ask(subject: str, schema: dict[str, Any]) -> tuple[str, str]:
        completion = openai_client.chat.completions.create(
            model="",
            messages=json_prompt(subject),  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
        )
        choice = completion.choices[0]
        return choice.message.content or "", choice.finish_reason

    assert_all_valid(in_parallel([lambda s=s, sc=sc: ask(s, sc) for s, sc in SCHEMAS]))


def test_twenty_schemas_through_named_tools_all_validate(openai_client: openai.OpenAI) -> None:
    def ask(subject: str, schema: dict[str, Any]) -> tuple[str, str]:
        completion = openai_client.chat.completions.create(
            model="",
            messages=json_prompt(subject),  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            tools=[{"type": "function", "function": {"name": "record", "parameters": schema}}],
            tool_choice={"type": "function", "function": {"name": "record"}},
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "record" and call.id.startswith("call_")
        return call.function.arguments, choice.finish_reason

    objects = [(subject, schema) for subject, schema in SCHEMAS if schema.get("type") == "object"]
    outputs = in_parallel([lambda s=s, sc=sc: ask(s, sc) for s, sc in objects])
    for (_, schema), (arguments, _) in zip(objects, outputs, strict=True):
        jsonschema.validate(json.loads(arguments), schema)


def test_tool_parameters_that_are_not_an_object_are_refused(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "record", "parameters": {"type": "array"}}}],
        )
    assert refused.value.body["param"] == "tools[0].function.parameters"  # type: ignore[index]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_tool_choice_without_parallel_calls_streams_one_call_of_a_listed_tool(
    openai_client: openai.OpenAI,
) -> None:
    stream = openai_client.chat.completions.create(
        model="", messages=WEATHER_ASK, max_tokens=MAX_TOKENS, temperature=0,  # type: ignore[arg-type]
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, stream=True,  # type: ignore[list-item]
    )  # fmt: skip
    name, arguments, finish, ids = "", "", None, set()
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                ids.add(call.id) if call.id else None
                name += call.function.name or "" if call.function else ""
                arguments += call.function.arguments or "" if call.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert len(ids) == 1
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])  # type: ignore[index]


def test_regex_choice_and_grammar_through_vllm_extras(openai_client: openai.OpenAI) -> None:
    def complete(**extra: Any) -> str:
        completion = openai_client.chat.completions.create(
            model="",
            messages=WEATHER_ASK,
            max_tokens=32,
            temperature=0,
            extra_body=extra,  # type: ignore[arg-type]
        )
        return completion.choices[0].message.content or ""

    regex, choice, grammar, new_choice = in_parallel(
        [
            lambda: complete(guided_regex=r"[A-Z][a-z]{2,8}"),
            lambda: complete(guided_choice=["sunny", "rainy"]),
            lambda: complete(guided_grammar=ARITHMETIC),
            lambda: complete(structured_outputs={"choice": ["warm", "cold"]}),
        ]
    )
    assert re.fullmatch(r"[A-Z][a-z]{2,8}", regex)
    assert choice in ("sunny", "rainy")
    assert is_arithmetic(grammar), grammar
    assert new_choice in ("warm", "cold")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format.json_schema.schema",
        ),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_grammar": "root ::= "}, "guided_grammar"),
        ({"structured_outputs": {"json": {"type": "integer", "minimum": 3, "maximum": 1}}}, "structured_outputs.json"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_constraints_through_the_gateway_are_400_naming_the_field(
    openai_client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.chat.completions.create(model="", messages=WEATHER_ASK, max_tokens=4, extra_body=extra)  # type: ignore[arg-type]
    assert error.value.body["param"] == param  # type: ignore[index]


def test_auto_tool_choice_with_a_response_format_answers_a_call_or_text_of_that_shape(
    openai_client: openai.OpenAI,
) -> None:
    """A call, or text the constraint shapes (with parallel calls SmolLM2 calls until it runs out of tokens)."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"]}
    completion = openai_client.chat.completions.create(
        model="", messages=WEATHER_ASK, max_tokens=MAX_TOKENS, temperature=0,  # type: ignore[arg-type]
        tools=[WEATHER, TIME], tool_choice="auto", parallel_tool_calls=False,  # type: ignore[list-item]
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
    )  # fmt: skip
    choice = completion.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        tools = {"get_weather": WEATHER, "get_time": TIME}
        for call in choice.message.tool_calls:
            parameters = tools[call.function.name]["function"]["parameters"]  # type: ignore[index]
            jsonschema.validate(json.loads(call.function.arguments), parameters)
    else:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
