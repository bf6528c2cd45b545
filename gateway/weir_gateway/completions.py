"""POST /v1/completions: one Generate call per prompt, choices indexed prompt × n + choice."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.generation import CallContext, Renderer, respond, stream_generate
from weir_gateway.logprobs import CompletionLogprobs
from weir_gateway.sampling import (
    MAX_LOGPROBS,
    apply_constraint,
    check_best_of,
    constraint_params,
    generation_fields,
    include_usage,
    sampling_params,
)
from weir_gateway.schema import Field, ObjectSchema, boolean, integer, refused, texts_or_token_ids
from weir_gateway.state import CONFIG, POOL, REQUEST_ID, call_context, fingerprint
from weir_gateway.tokenization import detokenize_texts
from weir_gateway.validation import Fields, is_token_id, read_json

DEFAULT_MAX_TOKENS = 16  # the OpenAI default for completions

Prompt = str | list[int]


@functools.lru_cache(maxsize=16)
def completion_request(config: GatewayConfig) -> ObjectSchema:
    """The completions request body's fields, with the limits of `config`."""
    return ObjectSchema(
        (
            Field("prompt", texts_or_token_ids(config.max_prompts), functools.partial(parse_prompts, config=config)),
            *generation_fields(config),
            boolean("echo", doc="prefix each choice with its prompt"),
            integer("best_of", 1, doc="only equal to n (or 1)"),
            integer("logprobs", 0, MAX_LOGPROBS, doc="the top-n alternatives of each token"),
            refused("suffix", "suffix insertion"),
            refused("tools", "tool calling is a chat feature; use /v1/chat/completions"),
            refused("tool_choice", "tool calling is a chat feature; use /v1/chat/completions"),
        ),
        required=("prompt",),
        open=True,
        strict=config.strict,
    )


def parse_prompts(fields: Fields, name: str = "prompt", *, config: GatewayConfig) -> list[Prompt]:
    """`prompt` as a list of prompts: a string, strings, token ids, or lists of token ids."""
    value = fields.raw(name)
    if value is None:
        raise fields.error(name, "required")
    if isinstance(value, str):
        prompts: list[Prompt] = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(is_token_id(t) for t in value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        prompts = [fields.token_ids(name, p) for p in value]
    else:
        raise fields.error(
            name, "expected a non-empty string, array of strings, array of token ids or array of token-id arrays"
        )
    if len(prompts) > config.max_prompts:
        raise fields.error(name, f"at most {config.max_prompts} prompts per request, got {len(prompts)}")
    if any(len(p) == 0 for p in prompts):
        raise fields.error(name, "prompts must not be empty")
    return prompts


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs = field(default_factory=CompletionLogprobs)
    finish_reason: str | None = None
    stop_reason: str | None = None
    echoed: bool = False


class CompletionRenderer(Renderer[_Choice]):
    """Completions JSON: `text_completion` objects and chunks."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args: Any, echo_texts: list[str] | None, logprobs: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.echo_texts = echo_texts
        self.want_logprobs = logprobs

    def update(self, prompt_index: int, message: pb.GenerateResponse) -> dict[str, Any]:
        """Record a message; return its choice as a stream chunk shows it (echo and logprobs included)."""
        index, reason = self.observe(prompt_index, message)
        choice = self.choices.setdefault(index, _Choice())
        text, items = message.text, list(message.logprobs)
        if self.echo_texts is not None and not choice.echoed:
            choice.echoed = True
            prompt_text = self.echo_texts[prompt_index]
            text = prompt_text + text
            if message.prompt_logprobs:
                items = list(message.prompt_logprobs) + items
            else:
                choice.logprobs.skip_text(prompt_text)
        logprobs = choice.logprobs.add(items) if self.want_logprobs else None
        choice.text.append(text)
        if reason is not None:
            choice.finish_reason, choice.stop_reason = reason, message.stop_reason or None
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": reason,
            "stop_reason": choice.stop_reason if reason else None,
        }

    def chunks(self, prompt_index: int, message: pb.GenerateResponse) -> list[dict[str, Any]]:
        choice = self.update(prompt_index, message)
        if not choice["text"] and choice["finish_reason"] is None and not message.logprobs:
            return []
        return [self.envelope(self.chunk_object_name) | {"choices": [choice]}]

    def choice_fields(self, choice: _Choice) -> dict[str, Any]:
        return {"text": "".join(choice.text), "logprobs": choice.logprobs.total if self.want_logprobs else None}


async def create_completion(request: web.Request) -> web.StreamResponse:
    """OpenAI /v1/completions, streaming or not."""
    config, pool = request.app[CONFIG], request.app[POOL]
    body = completion_request(config).read(Fields(await read_json(request)))
    model = body.value("model") or ""
    prompts: list[Prompt] = body.value("prompt")
    params = sampling_params(body, config, DEFAULT_MAX_TOKENS)
    check_best_of(body, params.n)
    logprobs = body.value("logprobs")
    echo = body.value("echo", False)
    if logprobs is not None:
        params.logprobs = logprobs
        if echo:
            params.prompt_logprobs = logprobs
    streaming = body.value("stream", False)
    usage = include_usage(body, streaming)

    ctx = call_context(request)
    request_id = request[REQUEST_ID]
    constraint = pb.GenerateRequest()  # only its `constraint` oneof, merged into every prompt's request
    constraint_source = apply_constraint(body, constraint)
    messages = []
    for i, prompt in enumerate(prompts):
        message = pb.GenerateRequest(
            model=model,
            request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
            sampling_params=params,
        )
        if isinstance(prompt, str):
            message.prompt = prompt
        else:
            message.token_ids.ids.extend(prompt)
        message.MergeFrom(constraint)
        messages.append(message)
    echo_texts = await _echo_texts(request, model, prompts, ctx) if echo else None

    renderer = CompletionRenderer(
        f"cmpl-{request_id}", model, params.n, usage, fingerprint(),
        echo_texts=echo_texts, logprobs=logprobs is not None,
    )  # fmt: skip
    stream = stream_generate(pool, model, messages, ctx, renamed_params=constraint_params(constraint_source))
    return await respond(request, stream, renderer, streaming=streaming, total_choices=len(prompts) * params.n)


async def _echo_texts(request: web.Request, model: str, prompts: list[Prompt], ctx: CallContext) -> list[str]:
    """The text each prompt echoes as: itself, or its token ids decoded by the backend."""
    token_prompts = [p for p in prompts if not isinstance(p, str)]
    if not token_prompts:
        return [p for p in prompts if isinstance(p, str)]
    decoded = iter(await detokenize_texts(request.app[POOL], model, token_prompts, ctx, skip_special=False))
    return [p if isinstance(p, str) else next(decoded) for p in prompts]
