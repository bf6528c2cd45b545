"""POST /v1/chat/completions: `messages` go to the server, which renders them with the model's chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.generation import Renderer, respond, stream_generate
from weir_gateway.logprobs import chat_logprob_entries
from weir_gateway.sampling import (
    CONSTRAINT_FIELDS,
    MAX_LOGPROBS,
    SAMPLING_FIELDS,
    UNSUPPORTED_FIELDS,
    apply_constraint,
    constraint_params,
    include_usage,
    sampling_params,
)
from weir_gateway.state import CONFIG, POOL, REQUEST_ID, call_context, fingerprint
from weir_gateway.tools import TOOL_FIELDS, ToolCallParser, ToolPlan, parse_tools
from weir_gateway.validation import Fields, read_json

KNOWN_FIELDS = SAMPLING_FIELDS | CONSTRAINT_FIELDS | TOOL_FIELDS | {"messages", "top_logprobs", "add_generation_prompt"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = frozenset({"role", "content"})
UNSUPPORTED_MESSAGE_FIELDS = {
    "name": "participant names",
    "tool_calls": "tool calling",
    "tool_call_id": "tool calling",
    "function_call": "function calling",
    "audio": "audio",
}


def parse_messages(fields: Fields) -> list[pb.ChatMessage]:
    """`messages` as proto turns: known roles only, content a string or a list of text parts (joined)."""
    items = fields.array("messages")
    if not items:
        raise fields.error("messages", "must be a non-empty array of messages")
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise fields.error(f"messages[{i}]", "expected an object with `role` and `content`")
        message = Fields(item, prefix=f"messages[{i}].")
        message.reject_unknown(MESSAGE_FIELDS, UNSUPPORTED_MESSAGE_FIELDS)
        role = message.string("role")
        if role not in ROLES:
            if role in ("tool", "function"):
                raise message.error("role", f"{role!r} messages are not supported by Weir yet (tool calling)")
            raise message.error("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        turns.append(pb.ChatMessage(role=ROLES[role], content=_content(message, role)))
    return turns


def _content(message: Fields, role: str) -> str:
    content = message.raw("content")
    if content is None:
        if role == "assistant":  # an assistant turn may be empty
            return ""
        raise message.error("content", "required")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise message.error("content", "expected a string or an array of content parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise message.error(f"content[{j}]", "expected a content part object")
        part_fields = Fields(part, prefix=f"{message.param('content')}[{j}].")
        kind = part_fields.string("type")
        if kind != "text":
            raise part_fields.error("type", f"only 'text' content parts are supported, got {kind!r}")
        part_fields.reject_unknown(frozenset({"type", "text"}))
        text = part_fields.string("text")
        if text is None:
            raise part_fields.error("text", "required")
        texts.append(text)
    return "\n".join(texts)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None
    tool_call: ToolCallParser | None = None  # when the request forces a tool call

    def message(self) -> dict[str, Any]:
        """The choice's assistant message: its text, or its tool call once the call's name is known."""
        if self.tool_call is not None and self.tool_call.name is not None:
            return {"role": "assistant", "content": None, "tool_calls": [self.tool_call.message()]}
        return {"role": "assistant", "content": "".join(self.text)}


class ChatRenderer(Renderer):
    """Chat JSON: `chat.completion` objects and `chat.completion.chunk`s."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, *args: Any, logprobs: bool, tools: ToolPlan | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.want_logprobs = logprobs
        self.tools = tools
        self.choices: dict[int, _Choice] = {}

    def _update(
        self, prompt_index: int, message: pb.GenerateResponse
    ) -> tuple[int, str | None, dict[str, Any], list[Any]]:
        """Record a message; return its choice's index, finish reason, stream delta and logprob entries."""
        index, reason = self.observe(prompt_index, message)
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = _Choice(tool_call=ToolCallParser(self.tools) if self.tools else None)
        entries = chat_logprob_entries(message.logprobs) if self.want_logprobs else []
        choice.text.append(message.text)
        choice.logprobs.extend(entries)
        delta: dict[str, Any] = {"content": message.text} if message.text else {}
        if choice.tool_call is not None:
            call = choice.tool_call.feed(message.text, reason)
            delta = {"tool_calls": [call.as_json()]} if call is not None else {}
            if reason == "stop" and choice.tool_call.name is not None:
                reason = "tool_calls"
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

    def chunk(self, prompt_index: int, message: pb.GenerateResponse) -> dict[str, Any] | None:
        index, reason, delta, entries = self._update(prompt_index, message)
        if not delta and reason is None and not entries:
            return None
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": entries} if self.want_logprobs else None,
            "finish_reason": reason,
        }
        if reason is not None:
            choice["stop_reason"] = self.choices[index].stop_reason
        return self.envelope(self.chunk_object_name) | {"choices": [choice]}

    def add(self, prompt_index: int, message: pb.GenerateResponse) -> None:
        self._update(prompt_index, message)

    def body(self) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "message": choice.message(),
                "logprobs": {"content": choice.logprobs} if self.want_logprobs else None,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
            for index, choice in sorted(self.choices.items())
        ]
        return self.envelope(self.object_name) | {"choices": choices, "usage": self.usage.as_json()}


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """OpenAI /v1/chat/completions, streaming or not."""
    config, pool = request.app[CONFIG], request.app[POOL]
    fields = Fields(await read_json(request))
    fields.reject_unknown(KNOWN_FIELDS, UNSUPPORTED_FIELDS)
    model = fields.string("model", "") or ""
    turns = parse_messages(fields)
    context_length = pool.context_length(model, pb.MODEL_TASK_GENERATE)
    # Chat has no max_tokens default of its own: generate up to the context length, as OpenAI does.
    default_max_tokens = min(config.max_tokens, context_length) if context_length else config.max_tokens
    params = sampling_params(fields, config, default_max_tokens)
    logprobs = bool(fields.boolean("logprobs", False))
    top_logprobs = fields.integer("top_logprobs", lo=0, hi=MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise fields.error("top_logprobs", "requires `logprobs` to be true")
    if logprobs:
        params.logprobs = top_logprobs or 0
    streaming = bool(fields.boolean("stream", False))
    usage = include_usage(fields, streaming)

    request_id = request[REQUEST_ID]
    message = pb.GenerateRequest(model=model, request_id=request_id, sampling_params=params)
    message.messages.messages.extend(turns)
    message.messages.add_generation_prompt = bool(fields.boolean("add_generation_prompt", True))
    constraint_source = apply_constraint(fields, message)
    tools = parse_tools(fields)
    if tools is not None:
        if constraint_source is not None:
            raise fields.error("tools", f"cannot be combined with {constraint_source.split('.')[0]}")
        message.json_schema = json.dumps(tools.schema())
        constraint_source = "tools"

    renderer = ChatRenderer(
        f"chatcmpl-{request_id}", model, params.n, usage, fingerprint(), logprobs=logprobs, tools=tools
    )
    renamed = constraint_params(constraint_source)
    stream = stream_generate(pool, model, [message], call_context(request), renamed_params=renamed)
    return await respond(request, stream, renderer, streaming=streaming, total_choices=params.n)
