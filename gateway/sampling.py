"""The request fields chat and completions share: sampling parameters, unsupported fields, output constraints."""

from __future__ import annotations

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.errors import ApiError
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
    "guided_json": "structured output",
    "guided_regex": "structured output",
    "guided_choice": "structured output",
    "guided_grammar": "structured output",
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


def apply_constraint(fields: Fields, request: pb.GenerateRequest) -> None:
    """Translate `response_format` into the request's `constraint` oneof; only free text is supported yet."""
    response_format = fields.object_fields("response_format")
    if response_format is None:
        return
    kind = response_format.string("type")
    if kind == "text":
        return
    raise ApiError(
        400,
        f"response_format type {kind!r} is not supported by Weir yet (structured output)",
        param="response_format",
        code="unsupported_value",
    )
