"""The request fields chat and completions share: sampling parameters, logit bias, ignored and refused fields,
and output constraints."""

from __future__ import annotations

import functools
import json
import math

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.schema import (
    TOKEN_ID_SCHEMA,
    Body,
    Field,
    ObjectSchema,
    Use,
    boolean,
    integer,
    nested,
    number,
    refused,
    string,
)
from weir_gateway.validation import INT32_MAX, INT64_MAX, INT64_MIN, Fields, is_token_id

MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI and the server allow


def generation_fields(config: GatewayConfig) -> tuple[Field, ...]:
    """The fields chat and completions share, with the limits of `config`."""
    max_tokens = functools.partial(integer, lo=1, hi=config.max_tokens)
    return (
        string("model", doc="model id; empty or absent means the server's default generation model"),
        max_tokens("max_tokens", doc="most tokens per choice"),
        max_tokens("max_completion_tokens", doc="OpenAI's newer name for max_tokens; wins over it"),
        integer("min_tokens", 0, config.max_tokens, doc="vLLM extra: fewest tokens before a stop may end a choice"),
        number("temperature", 0.0, 2.0),
        number("top_p", 0.0, 1.0, exclusive_lo=True),
        integer("top_k", -1, INT32_MAX, doc="vLLM extra; 0 or -1 is off"),
        number("min_p", 0.0, 1.0, doc="vLLM extra"),
        number("repetition_penalty", 0.0, 2.0, exclusive_lo=True, doc="vLLM extra"),
        number("presence_penalty", -2.0, 2.0),
        number("frequency_penalty", -2.0, 2.0),
        integer("n", 1, config.max_n, doc="choices per prompt; above the gateway's --max-n is a 400"),
        integer("seed", INT64_MIN, INT64_MAX),
        Field("stop", STOP_SCHEMA, lambda f, n: f.strings(n, MAX_STOP_STRINGS), doc="up to 16 stop strings"),
        Field("stop_token_ids", {"type": "array", "items": TOKEN_ID_SCHEMA, "maxItems": MAX_STOP_TOKEN_IDS},
              lambda f, n: f.token_ids(n, max_items=MAX_STOP_TOKEN_IDS), doc="vLLM extra"),
        boolean("ignore_eos", doc="vLLM extra"),
        boolean("skip_special_tokens", doc="vLLM extra"),
        boolean("include_stop_str_in_output", doc="vLLM extra"),
        Field("logit_bias", LOGIT_BIAS_SCHEMA, read_logit_bias,
              doc="token id (as a string) -> bias in [-100, 100], added to the logits; -100 bans the token"),
        boolean("stream"),
        nested("stream_options", stream_options_schema(config.strict), doc="only with stream: true"),
        *CONSTRAINT_FIELD_SPECS,
        string("user", use=Use.IGNORED, doc="end-user id"),
        Field("metadata", {"type": "object", "additionalProperties": {"type": "string"}}, _read_metadata,
              Use.IGNORED, "key-value tags"),
        boolean("store", use=Use.IGNORED, doc="OpenAI's stored completions"),
        string("service_tier", use=Use.IGNORED, doc="OpenAI's processing tiers"),
        string("prompt_cache_key", use=Use.IGNORED, doc="OpenAI's cache routing hint"),
        string("safety_identifier", use=Use.IGNORED, doc="OpenAI's end-user id for abuse detection"),
        string("guided_decoding_backend", use=Use.IGNORED, doc="vLLM extra; Weir always uses xgrammar"),
        refused("functions", "legacy function calling; use tools"),
        refused("function_call", "legacy function calling; use tool_choice"),
        refused("audio", "unsupported modality: audio output"),
        refused("web_search_options", "web search"),
    )  # fmt: skip


STOP_SCHEMA = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
    ]
}
LOGIT_BIAS_SCHEMA = {
    "type": "object",
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    "maxProperties": MAX_LOGIT_BIAS,
}


def read_logit_bias(fields: Fields, name: str) -> dict[int, float]:
    """OpenAI's logit_bias: token-id strings (integers >= 0) to finite biases in [-100, 100]. Ids beyond the
    vocabulary are the server's to refuse (it knows the vocabulary; its error names `logit_bias` too)."""
    value = fields.object_fields(name)
    assert value is not None
    if len(value.body) > MAX_LOGIT_BIAS:
        raise fields.error(name, f"at most {MAX_LOGIT_BIAS} entries, got {len(value.body)}")
    bias = {}
    for key, amount in value.body.items():
        token_id = int(key) if key.isascii() and key.isdigit() else -1
        if not is_token_id(token_id):
            raise fields.error(name, f"keys must be token ids (integers in [0, {INT32_MAX}]), got {key!r}")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
            raise fields.error(name, f"the bias of token {key} must be a number, got {amount!r}")
        if not -100 <= amount <= 100:
            raise fields.error(name, f"the bias of token {key} must be in [-100, 100], got {amount}")
        bias[token_id] = float(amount)
    return bias


def _read_metadata(fields: Fields, name: str) -> None:
    value = fields.object_fields(name)
    assert value is not None
    if not all(isinstance(v, str) for v in value.body.values()):
        raise fields.error(name, "values must be strings")


@functools.lru_cache(maxsize=4)
def stream_options_schema(strict: bool) -> ObjectSchema:
    return ObjectSchema(
        (
            boolean("include_usage", doc="a last chunk with the usage of the whole request"),
            boolean("include_obfuscation", use=Use.IGNORED, doc="OpenAI's padding of stream events"),
            refused("continuous_usage_stats", "per-chunk usage"),
        ),
        strict=strict,
    )


@functools.lru_cache(maxsize=16)
def _generation_schema(config: GatewayConfig) -> ObjectSchema:
    return ObjectSchema(generation_fields(config), open=True, strict=config.strict)


def sampling_params(fields: Fields, config: GatewayConfig, default_max_tokens: int | None) -> pb.SamplingParams:
    """The proto SamplingParams of a chat or completions body (logprobs are set by each endpoint). `fields` is the
    Body its endpoint's schema read, or a raw object whose shared generation fields are checked here."""
    body = fields if isinstance(fields, Body) else _generation_schema(config).read(fields, declared_only=True)
    params = pb.SamplingParams()
    max_tokens = body.value("max_completion_tokens", body.value("max_tokens", default_max_tokens))
    if max_tokens is not None:
        params.max_tokens = max_tokens
    min_tokens = body.value("min_tokens", 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise body.error("min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")
    params.min_tokens = min_tokens
    for name in ("temperature", "top_p", "repetition_penalty", "seed", "skip_special_tokens"):
        if body.has(name):  # optional in the proto: unset means the server's default
            setattr(params, name, body.value(name))
    params.top_k = max(body.value("top_k", 0), 0)  # vLLM spells "off" as -1, Weir as 0
    params.min_p = body.value("min_p", 0.0)
    params.presence_penalty = body.value("presence_penalty", 0.0)
    params.frequency_penalty = body.value("frequency_penalty", 0.0)
    params.stop.extend(body.value("stop", []))
    params.stop_token_ids.extend(body.value("stop_token_ids", []))
    params.ignore_eos = body.value("ignore_eos", False)
    params.n = body.value("n", 1)
    params.include_stop_str_in_output = body.value("include_stop_str_in_output", False)
    for token_id, bias in body.value("logit_bias", {}).items():
        params.logit_bias[token_id] = bias
    return params


def check_best_of(fields: Body, n: int) -> None:
    """`best_of` equal to n (or 1) asks for nothing beyond n; any other value is refused."""
    best_of = fields.value("best_of")
    if best_of is not None and best_of not in (1, n):
        raise fields.error("best_of", f"not supported by Weir yet (best_of must equal n={n})")


def include_usage(fields: Body, stream: bool) -> bool:
    """`stream_options.include_usage`, which is only allowed on streams."""
    options: Body | None = fields.value("stream_options")
    if options is None:
        return False
    if not stream:
        raise fields.error("stream_options", "only allowed when stream is true")
    return bool(options.value("include_usage", False))


# Where an output constraint may come from: OpenAI's `response_format` and vLLM's extras, old and new.
JSON_SCHEMA_VALUE = {"oneOf": [{"type": "object"}, {"type": "string"}, {"type": "boolean"}]}  # or its JSON text
RESPONSE_FORMAT_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": {
            "type": "object",
            "nullable": True,
            "properties": {
                "name": {"type": "string", "nullable": True},
                "description": {"type": "string", "nullable": True},
                "schema": JSON_SCHEMA_VALUE | {"nullable": True},
                "strict": {"type": "boolean", "nullable": True},
            },
            "additionalProperties": False,
        },
    },
    "required": ["type"],
}
STRUCTURED_OUTPUTS_SCHEMA = {
    "type": "object",
    "description": "vLLM extra: exactly one of its fields",
    "properties": {
        "json": JSON_SCHEMA_VALUE | {"nullable": True},
        "json_object": {"type": "boolean", "nullable": True},
        "regex": {"type": "string", "minLength": 1, "nullable": True},
        "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1, "nullable": True},
        "grammar": {"type": "string", "minLength": 1, "nullable": True},
    },
    "additionalProperties": False,
}
# Their shapes are checked here; apply_constraint reads them (only one may be set).
CONSTRAINT_FIELD_SPECS = (
    Field("response_format", RESPONSE_FORMAT_SCHEMA, lambda f, n: f.object_fields(n),
          doc="text, json_object or json_schema (constrained decoding)"),
    Field("guided_json", JSON_SCHEMA_VALUE, lambda f, n: f.raw(n), doc="vLLM extra: a JSON schema"),
    Field("guided_regex", {"type": "string", "minLength": 1}, lambda f, n: f.string(n), doc="vLLM extra"),
    Field("guided_choice", {"type": "array", "items": {"type": "string"}, "minItems": 1},
          lambda f, n: f.array(n), doc="vLLM extra"),
    Field("guided_grammar", {"type": "string", "minLength": 1}, lambda f, n: f.string(n), doc="vLLM extra: EBNF"),
    Field("structured_outputs", STRUCTURED_OUTPUTS_SCHEMA, lambda f, n: f.object_fields(n), doc="vLLM extra"),
)  # fmt: skip
CONSTRAINT_FIELDS = frozenset(f.name for f in CONSTRAINT_FIELD_SPECS)
_GUIDED_KINDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_OUTPUT_KINDS = frozenset({"json", "json_object", "regex", "choice", "grammar"})
# The server names a bad constraint by its oneof field; these are every field it may name.
CONSTRAINT_ONEOF_FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def apply_constraint(fields: Fields, request: pb.GenerateRequest) -> str | None:
    """Set the request's `constraint` oneof from whichever constraint field the body uses; return that
    field's name (so the server's complaints about it can name it), or None for free text."""
    sources = sorted(name for name in CONSTRAINT_FIELDS if fields.present(name))
    if len(sources) > 1:
        raise fields.error(sources[1], f"set only one output constraint, got {' and '.join(sources)}")
    if not sources:
        return None
    name = sources[0]
    if name == "response_format":
        return _response_format(fields, request)
    if name == "structured_outputs":
        return _structured_outputs(fields, request)
    _set_constraint(fields, name, _GUIDED_KINDS[name], request)
    return name


def constraint_params(source: str | None) -> dict[str, str]:
    """The server's names for a constraint field, each mapped to the body field `source` it came from."""
    return dict.fromkeys(CONSTRAINT_ONEOF_FIELDS, source) if source else {}


def _response_format(fields: Fields, request: pb.GenerateRequest) -> str | None:
    response_format = fields.object_fields("response_format")
    assert response_format is not None
    kind = response_format.string("type")
    if kind == "text":
        response_format.reject_unknown(frozenset({"type"}))
        return None
    if kind == "json_object":
        response_format.reject_unknown(frozenset({"type"}))
        request.json_object = True
        return "response_format"
    if kind == "json_schema":
        response_format.reject_unknown(frozenset({"type", "json_schema"}))
        spec = response_format.object_fields("json_schema")
        if spec is None:
            raise response_format.error("json_schema", "required when type is 'json_schema'")
        spec.reject_unknown(frozenset({"name", "description", "schema", "strict"}))
        spec.string("name")
        spec.string("description")
        spec.boolean("strict")  # the output always follows the schema, strict or not
        if not spec.present("schema"):
            raise spec.error("schema", "required")
        _set_constraint(spec, "schema", "json", request)
        return spec.param("schema")
    if kind is None:
        raise response_format.error("type", "required")
    raise response_format.error("type", f"must be one of 'text', 'json_object', 'json_schema', got {kind!r}")


def _structured_outputs(fields: Fields, request: pb.GenerateRequest) -> str:
    options = fields.object_fields("structured_outputs")
    assert options is not None
    options.reject_unknown(_STRUCTURED_OUTPUT_KINDS)
    kinds = sorted(kind for kind in _STRUCTURED_OUTPUT_KINDS if options.present(kind))
    if len(kinds) != 1:
        raise fields.error("structured_outputs", f"set exactly one of {', '.join(sorted(_STRUCTURED_OUTPUT_KINDS))}")
    if kinds[0] == "json_object":
        if not options.boolean("json_object"):
            raise options.error("json_object", "must be true when set")
        request.json_object = True
    else:
        _set_constraint(options, kinds[0], kinds[0], request)
    return options.param(kinds[0])


def _set_constraint(fields: Fields, name: str, kind: str, request: pb.GenerateRequest) -> None:
    """Put the field's value into the oneof: json (an object, boolean or JSON text), regex, choice or grammar."""
    value = fields.raw(name)
    if kind == "json":
        if isinstance(value, dict | bool):
            request.json_schema = json.dumps(value)
        elif isinstance(value, str):
            request.json_schema = value  # JSON text; the server parses and checks it
        else:
            raise fields.error(name, "expected a JSON schema (an object, or its JSON text)")
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise fields.error(name, "expected a non-empty array of strings")
        request.choice.values.extend(value)
    else:
        text = fields.string(name)
        if not text:
            raise fields.error(name, "must be a non-empty string")
        setattr(request, kind, text)
