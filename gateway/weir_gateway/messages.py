"""Chat `messages` as weir.v1 turns: the roles agents send, assistant tool calls, tool results and text parts.

`developer` turns become `system` turns. The legacy `function` role (and `function_call`) is refused by name: its
results carry no call id, so they cannot answer a call; clients send `tool` turns instead."""

from __future__ import annotations

import functools
import json
from typing import Any

from weir.v1 import inference_pb2 as pb
from weir_gateway.schema import Body, Field, ObjectSchema, Use, nested, refused, string
from weir_gateway.validation import Fields

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TEXT_PART_SCHEMA = ObjectSchema(
    (string("type", ("text",)), string("text")), required=("type", "text")
)  # image, audio and file parts are refused before this is read


def _read_arguments(fields: Fields, name: str) -> str:
    """A call's arguments: the JSON text of an object (empty reads as no arguments, as the server reads it)."""
    text = fields.string(name)
    assert text is not None
    try:
        parsed = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError) as e:
        raise fields.error(name, f"is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise fields.error(name, "must be the JSON text of an object")
    return text


def _read_nonempty(fields: Fields, name: str) -> str:
    text = fields.string(name)
    if not text:
        raise fields.error(name, "must not be empty")
    return text


CALLED_FUNCTION_SCHEMA = ObjectSchema(
    (
        Field("name", {"type": "string", "minLength": 1}, _read_nonempty),
        Field("arguments", {"type": "string"}, _read_arguments, doc="the JSON text of an object"),
    ),
    required=("name", "arguments"),
)
TOOL_CALL_SCHEMA = ObjectSchema(
    (
        Field("id", {"type": "string", "minLength": 1}, _read_nonempty, doc="answered by a later tool turn"),
        string("type", ("function",)),
        nested("function", CALLED_FUNCTION_SCHEMA),
    ),
    required=("id", "function"),
)
CONTENT_SCHEMA = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART_SCHEMA.openapi()}],
    "description": "a string or text parts (joined by newlines); null on an assistant turn with tool calls",
}


@functools.lru_cache(maxsize=4)
def message_schema(strict: bool) -> ObjectSchema:
    """One message; other keys are vendor extras (ignored unless strict)."""
    return ObjectSchema(
        (
            string("role", tuple(ROLES), doc="developer is read as system"),
            Field("content", CONTENT_SCHEMA, lambda f, n: f.raw(n)),
            string("name", doc="passed to the chat template"),
            Field("tool_calls", {"type": "array", "items": TOOL_CALL_SCHEMA.openapi()}, lambda f, n: f.array(n),
                  doc="assistant turns: the calls made"),
            string("tool_call_id", doc="tool turns: the call answered"),
            string("refusal", use=Use.IGNORED, doc="assistant turns"),
            string("reasoning_content", use=Use.IGNORED, doc="earlier reasoning (templates leave it out)"),
            string("reasoning", use=Use.IGNORED, doc="earlier reasoning, vLLM's newer name"),
            refused("function_call", "legacy function calling; send tool_calls"),
            refused("audio", "unsupported modality: audio"),
        ),
        required=("role",),
        open=True,
        strict=strict,
    )  # fmt: skip


def messages_field(strict: bool) -> Field:
    """The `messages` field of a chat request: a non-empty array of messages, read as proto turns."""
    schema = {"type": "array", "items": message_schema(strict).openapi(), "minItems": 1}
    return Field("messages", schema, functools.partial(_read_messages, strict=strict))


def _read_messages(fields: Fields, name: str, *, strict: bool) -> list[pb.ChatMessage]:
    items = fields.array(name)
    if not items:
        raise fields.error(name, "must be a non-empty array of messages")
    call_ids: set[str] = set()  # the calls made so far, which a tool turn may answer
    turns = []
    for raw in fields.objects(name, items, "an object with `role` and `content`"):
        role = raw.string("role")
        if role == "function":
            raise raw.error("role", "the legacy 'function' role is not supported; send a 'tool' turn with tool_call_id")
        if role not in ROLES:
            raise raw.error("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        turns.append(_turn(message_schema(strict).read(raw), role, call_ids))
    return turns


def _turn(message: Body, role: str, call_ids: set[str]) -> pb.ChatMessage:
    turn = pb.ChatMessage(role=ROLES[role], name=message.value("name", ""))
    calls = message.value("tool_calls")
    if calls:
        if role != "assistant":
            raise message.error("tool_calls", "only assistant turns make tool calls")
        raws = message.objects("tool_calls", calls, "a tool call object")
        turn.tool_calls.extend(_tool_call(raw, j) for j, raw in enumerate(raws))
        call_ids.update(call.id for call in turn.tool_calls)
    call_id = message.value("tool_call_id")
    if role == "tool":
        if call_id is None:
            raise message.error("tool_call_id", "required on a tool turn: the id of the call it answers")
        if call_id not in call_ids:
            raise message.error("tool_call_id", f"{call_id!r} answers no tool call made earlier in the conversation")
        turn.tool_call_id = call_id
    elif call_id is not None:
        raise message.error("tool_call_id", "only tool turns answer a call")
    content = message.value("content")
    if content is None and role != "assistant":  # an assistant turn may be empty or only call tools
        raise message.error("content", "required")
    if isinstance(content, str):
        turn.content = content
    elif content is not None:
        turn.content_parts.extend(_parts(message, content))
    return turn


def _tool_call(raw: Fields, index: int) -> pb.ToolCall:
    body = TOOL_CALL_SCHEMA.read(raw)
    function = body.value("function")
    return pb.ToolCall(
        id=body.value("id"), name=function.value("name"), arguments=function.value("arguments"), index=index
    )


def _parts(message: Body, content: Any) -> list[pb.ContentPart]:
    """Text parts; any other part is a modality Weir does not take, refused by name."""
    if not isinstance(content, list):
        raise message.error("content", "expected a string or an array of content parts")
    parts = []
    for raw in message.objects("content", content, "a content part object"):
        kind = raw.string("type")
        if kind != "text":
            raise raw.error("type", f"unsupported modality: only 'text' content parts are supported, got {kind!r}")
        parts.append(pb.ContentPart(text=TEXT_PART_SCHEMA.read(raw).value("text")))
    return parts
