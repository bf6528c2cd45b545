"""One source for the request definitions: /openapi.json lists exactly the fields each endpoint accepts, every
listed field is read by its endpoint, and docs/openai.md lists every field with what the gateway does with it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_fakes import EMBED_MODEL, GEN_MODEL
from gateway_support import RunningGateway, http

from weir_gateway.chat import chat_request
from weir_gateway.completions import completion_request
from weir_gateway.config import GatewayConfig
from weir_gateway.embeddings import embedding_request
from weir_gateway.messages import message_schema
from weir_gateway.openapi import request_schemas
from weir_gateway.responses import responses_request
from weir_gateway.sampling import stream_options_schema
from weir_gateway.schema import ObjectSchema, Use
from weir_gateway.tokenization import detokenize_request, tokenize_request

DOC = Path(__file__).resolve().parents[2] / "docs" / "openai.md"
# Each request body, where it is posted, and the smallest body it accepts.
ENDPOINTS = {
    "CompletionRequest": ("/v1/completions", {"model": GEN_MODEL, "prompt": "hi", "max_tokens": 2}),
    "ChatCompletionRequest": ("/v1/chat/completions",
                              {"model": GEN_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    "ResponseRequest": ("/v1/responses", {"model": GEN_MODEL, "input": "hi", "max_output_tokens": 2, "store": False}),
    "EmbeddingRequest": ("/v1/embeddings", {"model": EMBED_MODEL, "input": "hi"}),
    "TokenizeRequest": ("/tokenize", {"model": GEN_MODEL, "prompt": "hi"}),
    "DetokenizeRequest": ("/detokenize", {"model": GEN_MODEL, "tokens": [1]}),
}  # fmt: skip
WRONG_TYPE = [[["?"]]]  # no field takes an array of arrays of arrays of strings


@pytest.fixture(params=[False, True], ids=["lenient", "strict"])
def served(request, make_gateway: Callable[..., RunningGateway], fake) -> tuple[RunningGateway, GatewayConfig]:
    config = GatewayConfig(backends=(fake.address,), max_n=4, max_tokens=64, strict=request.param)
    return make_gateway(config), config


def test_every_endpoint_has_a_request_schema() -> None:
    assert set(request_schemas(GatewayConfig())) == set(ENDPOINTS)


def test_openapi_lists_exactly_the_fields_each_endpoint_accepts(served) -> None:
    gateway, config = served
    document = http("GET", gateway.url + "/openapi.json").json()
    for name, schema in request_schemas(config).items():
        described = document["components"]["schemas"][name]
        assert set(described["properties"]) == schema.accepted, name
        assert described["additionalProperties"] is not config.strict, name
        ignored = [f.name for f in schema.fields if f.use is Use.IGNORED]
        assert all((field in described["properties"]) is not config.strict for field in ignored), name


def test_every_listed_field_is_read_by_its_endpoint(served) -> None:
    """A wrong-typed value of each field /openapi.json lists gets a 400 naming that field as one the endpoint
    reads, never 'unrecognized'; a field it does not list is unrecognized under --strict."""
    gateway, config = served
    document = http("GET", gateway.url + "/openapi.json").json()
    for name, (path, body) in ENDPOINTS.items():
        for field in document["components"]["schemas"][name]["properties"]:
            reply = http("POST", gateway.url + path, body | {field: WRONG_TYPE})
            error = reply.json()["error"]
            assert reply.status == 400 and error["param"].startswith(field), (name, field, error)
            assert "unrecognized" not in error["message"] and "not supported" not in error["message"], (field, error)
        if config.strict:
            reply = http("POST", gateway.url + path, body | {"not_a_field": 1})
            assert reply.json()["error"]["message"] == "not_a_field: unrecognized request argument"


def test_refused_fields_are_named_and_not_listed(gateway: RunningGateway) -> None:
    document = http("GET", gateway.url + "/openapi.json").json()
    for name, (path, body) in ENDPOINTS.items():
        described = document["components"]["schemas"][name]
        for field in described.get("x-weir-refused", {}):
            assert field not in described["properties"]
            reply = http("POST", gateway.url + path, body | {field: "x"})
            assert reply.status == 400 and reply.json()["error"]["param"] == field
            assert "not supported by Weir" in reply.json()["error"]["message"]


def test_a_field_declared_twice_is_a_programming_error() -> None:
    schema = chat_request(GatewayConfig())
    with pytest.raises(ValueError, match="declared twice"):
        ObjectSchema(schema.fields + schema.fields[:1])


def _doc_sections() -> dict[str, set[tuple[str, str]]]:
    """docs/openai.md's field tables: heading -> {(field, use)}."""
    sections: dict[str, set[tuple[str, str]]] = {}
    heading = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif match := re.match(r"\| `([a-z_.]+)` \| (honoured|ignored|refused) \|", line):
            sections.setdefault(heading, set()).add((match.group(1), match.group(2)))
    return sections


def _uses(*schemas: ObjectSchema) -> set[tuple[str, str]]:
    return {(f.name, f.use.value) for schema in schemas for f in schema.fields}


@pytest.mark.parametrize(
    ("heading", "schemas"),
    [
        ("`POST /v1/chat/completions`", lambda c: [chat_request(c)]),
        ("Chat messages (`messages[i]`)", lambda c: [message_schema(False)]),
        ("`stream_options` (both generation endpoints)", lambda c: [stream_options_schema(False)]),
        ("`POST /v1/completions`", lambda c: [completion_request(c)]),
        ("`POST /v1/embeddings`", lambda c: [embedding_request(c)]),
        ("`POST /v1/responses`", lambda c: [responses_request(c)]),
        (
            "`POST /tokenize`, `POST /detokenize` (vLLM's)",
            lambda c: [tokenize_request(False), detokenize_request(False)],
        ),
    ],
)
def test_docs_list_every_field_with_its_use(heading: str, schemas: Callable[[GatewayConfig], Any]) -> None:
    assert _doc_sections()[heading] == _uses(*schemas(GatewayConfig()))
