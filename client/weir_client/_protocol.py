"""Request building, response conversion and channel options shared by the sync and async clients."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

from weir.v1 import inference_pb2 as pb
from weir_client import _chat as chat
from weir_client.control import CONTROL_METHODS, CONTROL_SERVICE
from weir_client.errors import WeirClientError
from weir_client.tasks import task_name
from weir_client.types import (
    AdapterInfo,
    Embeddings,
    GenerateOptions,
    GenerationChunk,
    ModelInfo,
    OutputOptions,
    SamplingOptions,
    Tokenization,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)

SERVICE = "weir.v1.InferenceService"
_IDEMPOTENT_METHODS = ("Embed", "Tokenize", "Detokenize", "ListModels", "ListAdapters")
_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
POOLINGS = {None: pb.POOLING_UNSPECIFIED, "mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS, "last": pb.POOLING_LAST}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")


def channel_options(max_attempts: int = 4, load_balancing: str | None = None) -> list[tuple[str, Any]]:
    """Message limits, and gRPC's own retry of UNAVAILABLE for the idempotent calls (never Generate).

    `load_balancing` ("round_robin" or "pick_first") spreads calls over every address the target resolves to
    (`dns:///host:port`, `ipv4:a:p,b:p`), skipping those whose grpc.health.v1 status is not SERVING."""
    if load_balancing is not None and load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)}, got {load_balancing!r}")
    names = [{"service": SERVICE, "method": m} for m in _IDEMPOTENT_METHODS]
    names += [{"service": CONTROL_SERVICE, "method": m} for m in CONTROL_METHODS]
    names.append({"service": "grpc.health.v1.Health", "method": "Check"})
    config: dict[str, Any] = {
        "methodConfig": [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max(2, max_attempts),
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Pings during a call notice a server host that vanished without closing the connection (Weir servers
        # accept pings every 10 s or slower).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.service_config", json.dumps(config)),
    ]


def generate_request(
    prompt: str | None,
    messages: Sequence[Mapping[str, Any]] | None,
    token_ids: Sequence[int] | None,
    model: str,
    request_id: str,
    add_generation_prompt: bool,
    options: GenerateOptions,
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one input and generate()'s keywords (sampling, tools, constraint); bad
    keywords raise before sending."""
    inputs = {"prompt": prompt, "messages": messages, "token_ids": token_ids}
    given = [name for name, value in inputs.items() if value is not None]
    if len(given) != 1:
        raise TypeError(f"generate() takes exactly one of prompt, messages or token_ids; got {given or 'none'}")
    output_names = OutputOptions.__annotations__
    sampling = cast(SamplingOptions, {k: v for k, v in options.items() if k not in output_names})
    request = pb.GenerateRequest(model=model, request_id=request_id, sampling_params=sampling_params(sampling))
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.add_generation_prompt = add_generation_prompt
        request.messages.messages.extend(chat.chat_messages(messages))
    else:
        request.token_ids.ids.extend(token_ids or ())
    chat.apply_output_options(request, options)
    return request


def sampling_params(options: SamplingOptions) -> pb.SamplingParams:
    """SamplingParams from keywords; unknown names raise TypeError, values the proto cannot hold raise
    WeirClientError(INVALID_ARGUMENT) naming the field, like the server would."""
    params = pb.SamplingParams()
    known = SamplingOptions.__annotations__
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"unknown sampling option {name!r}; expected one of {', '.join(known)}")
        if value is None:
            continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        try:
            if name == "logit_bias":
                params.logit_bias.update(_logit_bias(value))
            elif isinstance(value, (list, tuple)):
                getattr(params, name).extend(value)
            else:
                setattr(params, name, value)
        except (ValueError, TypeError) as e:
            raise WeirClientError.invalid_argument(f"sampling_params.{name}", f"invalid value {value!r}: {e}") from e
    return params


def _logit_bias(bias: object) -> dict[int, float]:
    """Token id -> bias; ids may be strings of digits, as OpenAI's JSON (and its SDK) has them."""
    if not isinstance(bias, Mapping):
        raise TypeError(f"must be a dict of token id to bias, got {type(bias).__name__}")
    return {_token_id(token_id): float(value) for token_id, value in bias.items()}


def _token_id(key: object) -> int:
    # int() alone would also take 1.5 or True and quietly bias some other token.
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"token ids must be ints or strings of digits, got {key!r}")
    return int(key)


def token_ids_messages(sequences: Sequence[Sequence[int]]) -> list[pb.TokenIds]:
    return [pb.TokenIds(ids=list(ids)) for ids in sequences]


def _logprobs(items: Sequence[pb.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            token_id=item.token_id,
            token=item.token,
            logprob=item.logprob if item.HasField("logprob") else None,
            token_bytes=item.token_bytes,
            top=tuple(TopLogprob(t.token_id, t.token, t.logprob, t.token_bytes) for t in item.top_logprobs),
        )
        for item in items
    ]


def usage(message: pb.Usage) -> Usage:
    return Usage(message.prompt_tokens, message.completion_tokens, message.cached_tokens, message.total_tokens)


def generation_chunk(message: pb.GenerateResponse) -> GenerationChunk:
    """One streamed message as a GenerationChunk."""
    finish_reason = _FINISH_REASONS.get(message.finish_reason)
    return GenerationChunk(
        request_id=message.request_id,
        model=message.model,
        index=message.index,
        text=message.text,
        token_ids=list(message.token_ids),
        logprobs=_logprobs(message.logprobs),
        finish_reason=finish_reason,
        stop_reason=message.stop_reason or None,
        usage=usage(message.usage) if message.HasField("usage") else None,
        prompt_token_ids=list(message.prompt_token_ids) or None,
        prompt_logprobs=_logprobs(message.prompt_logprobs) or None,
        reasoning_text=message.reasoning_text,
        tool_call_deltas=[
            ToolCallDelta(d.index, d.id or None, d.name or None, d.arguments) for d in message.tool_call_deltas
        ],
        tool_calls=[ToolCall(c.id, c.name, c.arguments, c.index) for c in message.tool_calls],
    )


def tokenizations(message: pb.TokenizeResponse, with_offsets: bool) -> list[Tokenization]:
    return [
        Tokenization(
            token_ids=list(r.token_ids),
            tokens=list(r.tokens),
            offsets=[(o.start, o.end) for o in r.offsets] if with_offsets else None,
        )
        for r in message.results
    ]


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        id=message.id,
        task=task_name(message.task),
        max_context_length=message.max_context_length,
        vocab_size=message.vocab_size,
        architecture=message.architecture,
        dtype=message.dtype,
        device=message.device,
        is_default=message.is_default,
        parent=message.parent,
        root=message.root,
    )


def adapter_info(message: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        name=message.name,
        path=message.path,
        base_model=message.base_model,
        rank=message.rank,
        alpha=message.alpha,
        target_modules=tuple(message.target_modules),
    )


def texts_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def embeddings(message: pb.EmbedResponse) -> Embeddings:
    vectors = [list(e.values) for e in sorted(message.embeddings, key=lambda e: e.index)]
    return Embeddings(message.model, vectors, message.usage.prompt_tokens)
