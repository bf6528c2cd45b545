"""POST /v1/chat/completions: `messages` and `tools` go to the server, which renders them with the model's chat
template and parses tool calls and reasoning out of the output; this maps both ways."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.generation import Renderer, respond, stream_generate
from weir_gateway.logprobs import chat_logprob_entries
from weir_gateway.messages import messages_field
from weir_gateway.sampling import (
    MAX_LOGPROBS,
    apply_constraint,
    constraint_params,
    generation_fields,
    include_usage,
    sampling_params,
)
from weir_gateway.schema import Field, ObjectSchema, Use, any_object, boolean, integer, refused, string
from weir_gateway.state import CONFIG, POOL, REQUEST_ID, call_context, fingerprint
from weir_gateway.tools import TOOL_FIELDS, ChoiceToolCalls, apply_tools
from weir_gateway.validation import Fields, read_json


def _read_modalities(fields: Fields, name: str) -> list[str]:
    values = fields.strings(name, max_items=4)
    if any(v != "text" for v in values):
        raise fields.error(name, f"unsupported modality: Weir answers with text only, got {values}")
    return values


@functools.lru_cache(maxsize=16)
def chat_request(config: GatewayConfig) -> ObjectSchema:
    """The chat request body's fields, with the limits of `config`."""
    return ObjectSchema(
        (
            messages_field(config.strict),
            *generation_fields(config),
            boolean("logprobs"),
            integer("top_logprobs", 0, MAX_LOGPROBS, doc="needs logprobs: true"),
            boolean("add_generation_prompt", doc="vLLM extra; default true"),
            *TOOL_FIELDS,
            any_object("chat_template_kwargs", doc="vLLM extra: variables for the chat template, e.g. enable_thinking"),
            Field("modalities", {"type": "array", "items": {"type": "string", "enum": ["text"]}}, _read_modalities,
                  doc='only ["text"]; other modalities are a 400'),
            string("reasoning_effort", use=Use.IGNORED, doc="the server's --reasoning-parser decides"),
            string("verbosity", use=Use.IGNORED, doc="OpenAI's answer-length hint"),
            any_object("prediction", use=Use.IGNORED, doc="predicted output, a latency hint"),
            refused("chat_template", "per-request chat templates; the server's --chat-template sets it"),
        ),
        required=("messages",),
        open=True,
        strict=config.strict,
    )  # fmt: skip


# The server names fields of weir.v1; these are the chat body's names for them where they differ.
_SERVER_NAMES = (
    (re.compile(r"^messages\.messages\["), "messages["),
    (re.compile(r"^(messages\[\d+\]\.tool_calls\[\d+\])\.(name|arguments)$"), r"\1.function.\2"),
    (re.compile(r"^(messages\[\d+\])\.content_parts"), r"\1.content"),
    (re.compile(r"^(tools\[\d+\])\.(name|description|parameters)$"), r"\1.function.\2"),
    (re.compile(r"^tool_choice\..*$"), "tool_choice"),
)


def body_param(server_param: str, constraint_source: str | None) -> str | None:
    """The chat body field a server error names (None when it is the same name)."""
    renamed = constraint_params(constraint_source).get(server_param)
    if renamed is not None:
        return renamed
    param = server_param
    for pattern, replacement in _SERVER_NAMES:
        param = pattern.sub(replacement, param)
    return param if param != server_param else None


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None
    calls: ChoiceToolCalls = field(default_factory=ChoiceToolCalls)

    def message(self) -> dict[str, Any]:
        """The choice's assistant message: content (null when it only called tools), calls and reasoning."""
        content = "".join(self.text)
        calls = self.calls.message()
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        if self.reasoning:
            message |= _reasoning("".join(self.reasoning))
        return message


def _reasoning(text: str) -> dict[str, str]:
    """Reasoning under vLLM's names: `reasoning_content` (older clients) and `reasoning` (vLLM >= 0.11.1)."""
    return {"reasoning_content": text, "reasoning": text}


class ChatRenderer(Renderer[_Choice]):
    """Chat JSON: `chat.completion` objects and `chat.completion.chunk`s."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, *args: Any, logprobs: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.want_logprobs = logprobs

    def update(
        self, prompt_index: int, message: pb.GenerateResponse
    ) -> tuple[int, str | None, dict[str, Any], list[Any]]:
        """Record a message; return its choice's index, finish reason, stream delta and logprob entries."""
        index, reason = self.observe(prompt_index, message)
        choice = self.choices.setdefault(index, _Choice())
        entries = chat_logprob_entries(message.logprobs) if self.want_logprobs else []
        choice.logprobs.extend(entries)
        delta: dict[str, Any] = {}
        if message.reasoning_text:
            choice.reasoning.append(message.reasoning_text)
            delta |= _reasoning(message.reasoning_text)
        if message.text:
            choice.text.append(message.text)
            delta["content"] = message.text
        tool_calls = choice.calls.feed(message.tool_call_deltas, message.tool_calls)
        if tool_calls:
            delta["tool_calls"] = tool_calls
        if reason is not None:
            choice.finish_reason, choice.stop_reason = reason, message.stop_reason or None
        return index, reason, delta, entries

    def start_chunks(self, total_choices: int) -> list[dict[str, Any]]:
        """The first chunk of each choice carries the role, as OpenAI sends it."""
        return [
            self.envelope(self.chunk_object_name)
            | {
                "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ]
            }
            for i in range(total_choices)
        ]

    def chunks(self, prompt_index: int, message: pb.GenerateResponse) -> list[dict[str, Any]]:
        index, reason, delta, entries = self.update(prompt_index, message)
        if not delta and reason is None and not entries:
            return []
        logprobs = {"content": entries} if self.want_logprobs else None
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        if reason is None:
            return [self._chunk(choice)]
        finish = {"finish_reason": reason, "stop_reason": self.choices[index].stop_reason}
        if "tool_calls" not in delta:
            return [self._chunk(choice | finish)]
        # The SDK's stream helper closes the last call on a chunk after it, as OpenAI sends the finish reason.
        return [self._chunk(choice), self._chunk({"index": index, "delta": {}, "logprobs": None} | finish)]

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return self.envelope(self.chunk_object_name) | {"choices": [choice]}

    def choice_fields(self, choice: _Choice) -> dict[str, Any]:
        return {"message": choice.message(), "logprobs": {"content": choice.logprobs} if self.want_logprobs else None}


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """OpenAI /v1/chat/completions, streaming or not."""
    config, pool = request.app[CONFIG], request.app[POOL]
    body = chat_request(config).read(Fields(await read_json(request)))
    model = body.value("model") or ""
    context_length = pool.context_length(model, pb.MODEL_TASK_GENERATE)
    # Chat has no max_tokens default of its own: generate up to the context length, as OpenAI does.
    default_max_tokens = min(config.max_tokens, context_length) if context_length else config.max_tokens
    params = sampling_params(body, config, default_max_tokens)
    logprobs = body.value("logprobs", False)
    top_logprobs = body.value("top_logprobs")
    if top_logprobs is not None and not logprobs:
        raise body.error("top_logprobs", "requires `logprobs` to be true")
    if logprobs:
        params.logprobs = top_logprobs or 0
    streaming = body.value("stream", False)
    usage = include_usage(body, streaming)

    request_id = request[REQUEST_ID]
    message = pb.GenerateRequest(model=model, request_id=request_id, sampling_params=params)
    message.messages.messages.extend(body.value("messages"))
    message.messages.add_generation_prompt = body.value("add_generation_prompt", True)
    apply_tools(body, message, body.value("tools", []))
    if body.has("chat_template_kwargs"):
        message.chat_template_kwargs = json.dumps(body.value("chat_template_kwargs"))
    # With tools in auto mode the server makes the output either calls or text of the constraint's shape.
    constraint_source = apply_constraint(body, message)

    renderer = ChatRenderer(f"chatcmpl-{request_id}", model, params.n, usage, fingerprint(), logprobs=logprobs)
    rename = functools.partial(body_param, constraint_source=constraint_source)
    stream = stream_generate(pool, model, [message], call_context(request), renamed_params=rename)
    return await respond(request, stream, renderer, streaming=streaming, total_choices=params.n)
