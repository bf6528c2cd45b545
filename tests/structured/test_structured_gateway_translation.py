"""The gateway's translation of OpenAI / vLLM constraint fields into weir.v1 (tools: tests/gateway)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from weir.v1 import inference_pb2 as pb
from weir_gateway.errors import ApiError
from weir_gateway.sampling import apply_constraint, constraint_params
from weir_gateway.validation import Fields

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


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
