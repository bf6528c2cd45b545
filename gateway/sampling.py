"""The request fields chat and completions share: sampling parameters, unsupported fields, output constraints."""

from __future__ import annotations

import json

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.validation import INT32_MAX, INT64_MAX, INT64_MIN, Fields

MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20

# Fields both endpoints accept (beyond their own); everything else is refused by name.
SAMPLING_FIELDS = frozenset(
    {
        "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
        "presence_penalty", "frequency_penalty", "logprobs", "user", "stream", "stream_options",
        # vLLM extras
        "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
        "skip_special_tokens", "include_stop_str_in_output",
    }
)  # fmt: skip

# OpenAI fields Weir knows but does not implement yet, with the reason shown to the client.
UNSUPPORTED_FIELDS = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "parallel_tool_calls": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "logit_bias": "logit bias",
    "audio": "audio output",
    "modalities": "non-text output",
    "prediction": "predicted outputs",
    "reasoning_effort": "reasoning models",
    "web_search_options": "web search",
    "store": "stored completions",
    "metadata": "stored completions",
    "service_tier": "service tiers",
    "suffix": "suffix insertion",
}


def sampling_params(fields: Fields, config: GatewayConfig, default_max_tokens: int | None) -> pb.SamplingParams:
    """The proto SamplingParams of a chat or completions body (logprobs are set by each endpoint)."""
    params = pb.SamplingParams()
    max_tokens = fields.integer("max_completion_tokens", lo=1, hi=config.max_tokens)
    if max_tokens is None:
        max_tokens = fields.integer("max_tokens", lo=1, hi=config.max_tokens)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        params.max_tokens = max_tokens
    min_tokens = fields.integer("min_tokens", 0, lo=0, hi=config.max_tokens) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise fields.error("min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")
    params.min_tokens = min_tokens
    _set_optional(params, "temperature", fields.number("temperature", lo=0.0, hi=2.0))
    top_p = fields.number("top_p", lo=0.0, hi=1.0)
    if top_p == 0.0:
        raise fields.error("top_p", "must be > 0")
    _set_optional(params, "top_p", top_p)
    top_k = fields.integer("top_k", 0, lo=-1, hi=INT32_MAX) or 0
    params.top_k = max(top_k, 0)  # vLLM spells "off" as -1, Weir as 0
    params.min_p = fields.number("min_p", 0.0, lo=0.0, hi=1.0) or 0.0
    repetition_penalty = fields.number("repetition_penalty", lo=0.0, hi=2.0)
    if repetition_penalty == 0.0:
        raise fields.error("repetition_penalty", "must be > 0")
    _set_optional(params, "repetition_penalty", repetition_penalty)
    params.presence_penalty = fields.number("presence_penalty", 0.0, lo=-2.0, hi=2.0) or 0.0
    params.frequency_penalty = fields.number("frequency_penalty", 0.0, lo=-2.0, hi=2.0) or 0.0
    _set_optional(params, "seed", fields.integer("seed", lo=INT64_MIN, hi=INT64_MAX))
    params.stop.extend(fields.strings("stop", MAX_STOP_STRINGS))
    if fields.present("stop_token_ids"):
        params.stop_token_ids.extend(fields.token_ids("stop_token_ids", max_items=MAX_STOP_TOKEN_IDS))
    params.ignore_eos = bool(fields.boolean("ignore_eos", False))
    params.n = fields.integer("n", 1, lo=1, hi=config.max_n) or 1
    _set_optional(params, "skip_special_tokens", fields.boolean("skip_special_tokens"))
    params.include_stop_str_in_output = bool(fields.boolean("include_stop_str_in_output", False))
    fields.string("user")  # accepted for OpenAI compatibility; only checked
    return params


def _set_optional(params: pb.SamplingParams, name: str, value: float | int | bool | None) -> None:
    if value is not None:
        setattr(params, name, value)


def check_best_of(fields: Fields, n: int) -> None:
    """`best_of` equal to n (or 1) asks for nothing beyond n; any other value is refused."""
    best_of = fields.integer("best_of", lo=1)
    if best_of is not None and best_of not in (1, n):
        raise fields.error("best_of", f"not supported by Weir yet (best_of must equal n={n})")


def include_usage(fields: Fields, stream: bool) -> bool:
    """`stream_options.include_usage`, which is only allowed on streams."""
    options = fields.object_fields("stream_options")
    if options is None:
        return False
    if not stream:
        raise fields.error("stream_options", "only allowed when stream is true")
    options.reject_unknown(frozenset({"include_usage"}), {"continuous_usage_stats": "per-chunk usage"})
    return bool(options.boolean("include_usage", False))


# Where an output constraint may come from: OpenAI's `response_format` and vLLM's extras, old and new.
CONSTRAINT_FIELDS = frozenset(
    {"response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"}
)
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
