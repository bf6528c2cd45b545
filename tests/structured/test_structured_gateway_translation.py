"""The gateway's translation of OpenAI / vLLM constraint fields and tools into weir.v1, and of calls back out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from weir.v1 import inference_pb2 as pb
from weir_gateway.errors import ApiError
from weir_gateway.sampling import apply_constraint, constraint_params
from weir_gateway.tools import ToolCallParser, ToolPlan, parse_tools
from weir_gateway.validation import Fields

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": SCHEMA}}
NOOP = {"type": "function", "function": {"name": "noop"}}


def constrain(body: dict[str, Any]) -> tuple[pb.GenerateRequest, str | None]:
    request = pb.GenerateRequest()
    source = apply_constraint(Fields(body), request)
    return request, source


@pytest.mark.parametrize(
    ("body", "kind", "value", "source"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            "json_schema",
            json.dumps(SCHEMA),
            "response_format.json_schema.schema",
        ),
        ({"guided_json": SCHEMA}, "json_schema", json.dumps(SCHEMA), "guided_json"),
        ({"guided_json": '{"type": "string"}'}, "json_schema", '{"type": "string"}', "guided_json"),
        ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+", "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "choice", ["a", "b"], "guided_choice"),
        ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"', "guided_grammar"),
        ({"structured_outputs": {"json": SCHEMA}}, "json_schema", json.dumps(SCHEMA), "structured_outputs.json"),
        ({"structured_outputs": {"regex": "a+"}}, "regex", "a+", "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["y"]}}, "choice", ["y"], "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": "g"}}, "grammar", "g", "structured_outputs.grammar"),
        ({"structured_outputs": {"json_object": True}}, "json_object", True, "structured_outputs.json_object"),
    ],
)
def test_constraint_fields_become_the_constraint_oneof(
    body: dict[str, Any], kind: str, value: Any, source: str
) -> None:
    request, found = constrain(body)
    assert request.WhichOneof("constraint") == kind
    got = getattr(request, kind)
    assert (list(got.values) if kind == "choice" else got) == value
    assert found == source
    assert set(constraint_params(found).values()) == {source}


def test_text_response_format_sets_no_constraint() -> None:
    request, source = constrain({"response_format": {"type": "text"}})
    assert request.WhichOneof("constraint") is None and source is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", 1]}, "guided_choice"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_json": 5}, "guided_json"),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ],
)
def test_bad_constraint_fields_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as error:
        constrain(body)
    assert error.value.status == 400
    assert error.value.param == param


def test_named_tool_choice_constrains_to_that_functions_parameters() -> None:
    plan = parse_tools(
        Fields({"tools": [WEATHER, NOOP], "tool_choice": {"type": "function", "function": {"name": "weather"}}})
    )
    assert plan is not None and plan.forced == "weather"
    assert plan.schema() == SCHEMA


def test_required_tool_choice_is_an_any_of_over_name_and_arguments() -> None:
    plan = parse_tools(Fields({"tools": [WEATHER, NOOP], "tool_choice": "required"}))
    assert plan is not None and plan.forced is None
    options = plan.schema()["anyOf"]
    assert [o["properties"]["name"] for o in options] == [{"const": "weather"}, {"const": "noop"}]
    assert options[0]["properties"]["arguments"] == SCHEMA
    assert all(o["required"] == ["name", "arguments"] for o in options)


def test_tool_choice_none_ignores_the_tools() -> None:
    assert parse_tools(Fields({"tools": [WEATHER], "tool_choice": "none"})) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [WEATHER]}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0].function"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
            "tools[0].function.name",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as error:
        parse_tools(Fields(body))
    assert error.value.param == param


def stream_call(plan: ToolPlan, pieces: list[str]) -> tuple[ToolCallParser, list[dict[str, Any]]]:
    parser = ToolCallParser(plan)
    deltas = []
    for i, piece in enumerate(pieces):
        delta = parser.feed(piece, "stop" if i == len(pieces) - 1 else None)
        if delta is not None:
            deltas.append(delta.as_json())
    return parser, deltas


def test_required_call_streams_its_name_then_the_arguments_without_the_wrapper() -> None:
    plan = ToolPlan((), None)  # the parser only reads the output; the tools matter for the schema
    head, rest = '{"name": "weather", "arguments":', ' {"a": {"b": [1]}}}'
    parser, deltas = stream_call(plan, [head] + [rest[i : i + 3] for i in range(0, len(rest), 3)])
    assert deltas[0]["id"] == parser.call_id and deltas[0]["function"]["name"] == "weather"
    assert all("id" not in d and "name" not in d["function"] for d in deltas[1:])
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"a": {"b": [1]}}'
    assert parser.message()["function"] == {"name": "weather", "arguments": '{"a": {"b": [1]}}'}


def test_named_call_streams_the_output_as_its_arguments() -> None:
    plan = ToolPlan((), "weather")
    parser, deltas = stream_call(plan, ['{"a"', ": 1}", ""])
    assert deltas[0]["function"]["name"] == "weather" and deltas[0]["type"] == "function"
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"a": 1}'
