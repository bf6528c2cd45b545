"""The `input` of a /v1/responses request as chat turns: messages, function calls and their outputs.

Consecutive `function_call` items (and an assistant message just before them) become one assistant turn with
`tool_calls`, as chat templates expect; a `function_call_output` becomes a "tool" turn and must answer a call
made earlier in the conversation. `reasoning` items are dropped: templates leave earlier reasoning out. Output
items a client sends back as they came (ids, statuses, annotations) are accepted as they are.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from weir.v1 import inference_pb2 as pb
from weir_gateway.schema import Body, Field, ObjectSchema, string
from weir_gateway.validation import Fields

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
ITEM_STATUSES = ("in_progress", "completed", "incomplete")
UNSUPPORTED_PARTS = {"input_image": "image input", "input_file": "file input", "input_audio": "audio input"}
UNSUPPORTED_ITEMS = {"item_reference": "item references"}  # any other item is a tool Weir does not run


def _array(fields: Fields, name: str) -> list[Any]:
    value = fields.array(name)
    assert value is not None
    return value


def _echoed(*, of_output: str) -> tuple[Field, ...]:
    return (string("id", doc=f"{of_output} received earlier"), string("status", ITEM_STATUSES))


TEXT_PARTS = {
    "input_text": ObjectSchema((string("type", ("input_text",)), string("text")), required=("type", "text")),
    "output_text": ObjectSchema(
        (string("type", ("output_text",)), string("text"),
         Field("annotations", {"type": "array"}, _array, doc="of output received earlier; not shown to the model"),
         Field("logprobs", {"type": "array"}, _array, doc="of output received earlier; not shown to the model")),
        required=("type", "text"),
    ),
    "refusal": ObjectSchema((string("type", ("refusal",)), string("refusal")), required=("type", "refusal")),
}  # fmt: skip
CONTENT_SCHEMA = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [p.openapi() for p in TEXT_PARTS.values()]}}],
    "description": "a string or text parts (joined by newlines); image, file and audio parts are a 400",
}


def _raw(fields: Fields, name: str) -> Any:
    return fields.raw(name)


@functools.lru_cache(maxsize=4)
def item_schemas(strict: bool) -> dict[str, ObjectSchema]:
    """The input items Weir reads, by type; other keys of an item are vendor extras (ignored unless strict)."""
    return {
        "message": ObjectSchema(
            (string("type", ("message",)), string("role", tuple(ROLES), doc="developer is read as system"),
             Field("content", CONTENT_SCHEMA, _raw), string("phase"), *_echoed(of_output="a message")),
            required=("role", "content"), open=True, strict=strict,
        ),
        "function_call": ObjectSchema(
            (string("type", ("function_call",)), string("call_id", doc="answered by a function_call_output"),
             string("name"), string("arguments", doc="JSON text of an object"), *_echoed(of_output="a call")),
            required=("type", "call_id", "name", "arguments"), open=True, strict=strict,
        ),
        "function_call_output": ObjectSchema(
            (string("type", ("function_call_output",)), string("call_id", doc="a call made earlier"),
             Field("output", CONTENT_SCHEMA, _raw), string("name"), *_echoed(of_output="an output")),
            required=("type", "call_id", "output"), open=True, strict=strict,
        ),
    }  # fmt: skip


def input_schema(strict: bool) -> dict[str, Any]:
    """`input`: a string (one user turn) or items; reasoning items may take any shape, since they are dropped."""
    reasoning = {"type": "object", "properties": {"type": {"type": "string", "enum": ["reasoning"]}},
                 "required": ["type"]}  # fmt: skip
    items = [schema.openapi() for schema in item_schemas(strict).values()]
    return {"oneOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [*items, reasoning]}}]}


def input_field(strict: bool) -> Field:
    """The `input` field; its items are read by `parse_input`, which knows the calls of earlier turns."""

    def read(fields: Fields, name: str) -> str | list[Any]:
        value = fields.raw(name)
        if not isinstance(value, str | list):
            raise fields.error(name, "expected a string or an array of input items")
        return value

    return Field("input", input_schema(strict), read, doc="a string, or messages, function calls and their outputs")


def instructions_turn(body: Body) -> list[pb.ChatMessage]:
    """`instructions` as the system turn that opens the conversation (never carried into a continuation)."""
    instructions = body.value("instructions")
    return [pb.ChatMessage(role="system", content=instructions)] if instructions else []


def parse_input(body: Body, call_names: Mapping[str, str], strict: bool) -> list[pb.ChatMessage]:
    """The turns of `input`; `call_names` maps the ids of calls made earlier in the conversation to their
    function names, since the tool results in `input` may answer those too."""
    value = body.value("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [pb.ChatMessage(role="user", content=value)]
    reader = _InputReader(dict(call_names), item_schemas(strict))
    for raw in body.objects("input", value, "an input item object"):
        reader.read(raw)
    return reader.turns


class _InputReader:
    """Folds input items into turns, remembering the calls they make."""

    def __init__(self, call_names: dict[str, str], schemas: dict[str, ObjectSchema]) -> None:
        self.call_names = call_names
        self.schemas = schemas
        self.turns: list[pb.ChatMessage] = []
        self._assistant_open = False  # whether a function_call item joins the last turn

    def read(self, raw: Fields) -> None:
        kind = raw.string("type") or "message"
        if kind == "reasoning":
            return  # earlier reasoning is not shown to the model again
        if kind in UNSUPPORTED_ITEMS:
            raise raw.error("type", f"not supported by Weir ({UNSUPPORTED_ITEMS[kind]})")
        if kind not in self.schemas:
            raise raw.error("type", f"{kind!r} items are not supported (Weir runs no built-in tools)")
        item = self.schemas[kind].read(raw)
        if kind == "message":
            role = item.value("role")
            self.turns.append(pb.ChatMessage(role=ROLES[role], content=_text(item, "content")))
            self._assistant_open = role == "assistant"
        elif kind == "function_call":
            self._function_call(item)
        else:
            self._function_output(item)

    def _function_call(self, item: Body) -> None:
        call_id, name, arguments = item.value("call_id"), item.value("name"), item.value("arguments")
        for field, value in (("call_id", call_id), ("name", name)):
            if not value:
                raise item.error(field, "required: a non-empty string")
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as e:
            raise item.error("arguments", f"is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise item.error("arguments", "must be the JSON text of an object")
        if call_id in self.call_names:
            raise item.error("call_id", f"{call_id!r} is already the id of an earlier call")
        if not self._assistant_open:
            self.turns.append(pb.ChatMessage(role="assistant"))
            self._assistant_open = True
        turn = self.turns[-1]
        turn.tool_calls.append(pb.ToolCall(id=call_id, name=name, arguments=arguments, index=len(turn.tool_calls)))
        self.call_names[call_id] = name

    def _function_output(self, item: Body) -> None:
        call_id = item.value("call_id")
        if call_id not in self.call_names:
            raise item.error("call_id", f"{call_id!r} answers no function_call earlier in the conversation")
        name = self.call_names[call_id]
        self.turns.append(pb.ChatMessage(role="tool", tool_call_id=call_id, name=name, content=_text(item, "output")))
        self._assistant_open = False


def _text(item: Body, name: str) -> str:
    """A message's content or a call's output: a string, or its text parts joined by newlines."""
    value = item.value(name)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise item.error(name, "expected a string or an array of content parts")
    texts = []
    for raw in item.objects(name, value, "a content part object"):
        kind = raw.string("type")
        if kind in UNSUPPORTED_PARTS:
            raise raw.error("type", f"unsupported modality: {UNSUPPORTED_PARTS[kind]}")
        if kind not in TEXT_PARTS:
            raise raw.error("type", f"must be one of {', '.join(map(repr, TEXT_PARTS))}, got {kind!r}")
        texts.append(TEXT_PARTS[kind].read(raw).value("refusal" if kind == "refusal" else "text"))
    return "\n".join(texts)
