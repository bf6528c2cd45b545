"""The /v1/responses request body as one table of fields (weir_gateway.schema): the handler checks bodies with
it and /openapi.json describes it, so the two cannot drift apart."""

from __future__ import annotations

import functools
from typing import Any

from weir_gateway.config import GatewayConfig
from weir_gateway.responses_input import input_field
from weir_gateway.responses_params import (
    BACKGROUND_FIELD,
    METADATA_FIELD,
    TEXT_SCHEMA,
    TOOL_FIELDS,
    TRUNCATION_FIELD,
)
from weir_gateway.schema import Field, ObjectSchema, Use, boolean, integer, nested, number, refused, string
from weir_gateway.validation import Fields

REASONING_SCHEMA = ObjectSchema((string("effort"), string("summary"), string("generate_summary")))
STREAM_OPTIONS_SCHEMA = ObjectSchema((boolean("include_obfuscation", use=Use.IGNORED, doc="padding of events"),))


def _strings(fields: Fields, name: str) -> list[str]:
    value = fields.array(name)
    if value is None or not all(isinstance(v, str) for v in value):
        raise fields.error(name, "expected an array of strings")
    return value


@functools.lru_cache(maxsize=16)
def responses_request(config: GatewayConfig) -> ObjectSchema:
    """The fields of a /v1/responses body, with the limits of `config`."""
    return ObjectSchema(
        (
            string("model", doc="model id; empty or absent means the server's default generation model"),
            input_field(config.strict),
            string("instructions", doc="a system turn before the conversation; not carried into continuations"),
            string("previous_response_id", doc="continue a response this gateway stored (400 when unknown)"),
            *TOOL_FIELDS,
            nested("text", TEXT_SCHEMA),
            integer("max_output_tokens", 1, config.max_tokens, doc="default: up to the context length"),
            number("temperature", 0.0, 2.0),
            number("top_p", 0.0, 1.0, exclusive_lo=True),
            boolean("stream", doc="server-sent events, each named by its type"),
            boolean("store", doc="default true: keep the response for GET and previous_response_id"),
            METADATA_FIELD,
            TRUNCATION_FIELD,
            BACKGROUND_FIELD,
            nested("reasoning", REASONING_SCHEMA, use=Use.IGNORED, doc="the server's --reasoning-parser decides"),
            Field("include", {"type": "array", "items": {"type": "string"}}, _strings, Use.IGNORED,
                  "extra output Weir does not make"),
            string("user", use=Use.IGNORED, doc="end-user id"),
            string("service_tier", use=Use.IGNORED, doc="OpenAI's processing tiers"),
            string("prompt_cache_key", use=Use.IGNORED, doc="OpenAI's cache routing hint"),
            string("safety_identifier", use=Use.IGNORED, doc="OpenAI's end-user id for abuse detection"),
            nested("stream_options", STREAM_OPTIONS_SCHEMA, use=Use.IGNORED),
            refused("conversation", "conversation objects; use previous_response_id"),
            refused("prompt", "prompt templates"),
            refused("max_tool_calls", "a cap on tool calls"),
            refused("top_logprobs", "log probabilities in responses"),
        ),
        open=True,
        strict=config.strict,
    )  # fmt: skip


# The body's OpenAPI schema under the default limits; /openapi.json uses responses_request(config).openapi().
RESPONSES_REQUEST_SCHEMA: dict[str, Any] = responses_request(GatewayConfig()).openapi()
