"""Tool calling over the gateway: `tools` and `tool_choice` in, as weir.v1 fields (the server renders the tools,
constrains and parses the calls), and the server's calls out, as the OpenAI SDK accumulates them."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from weir.v1 import inference_pb2 as pb
from weir_gateway.schema import Body, Field, ObjectSchema, boolean, nested, string
from weir_gateway.validation import Fields

logger = logging.getLogger(__name__)

MAX_TOOLS = 128  # OpenAI's limit, and the server's
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"  # OpenAI's rule, with dots as vLLM and the server allow
TOOL_CHOICE_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


def _read_name(fields: Fields, name: str) -> str:
    value = fields.string(name)
    assert value is not None
    if not re.fullmatch(FUNCTION_NAME_PATTERN, value):
        raise fields.error(name, "must be 1-64 letters, digits, underscores, dots or dashes")
    return value


def _read_parameters(fields: Fields, name: str) -> str:
    """The parameters as JSON text, once checked to be a JSON schema (of any draft jsonschema knows)."""
    value = fields.object_fields(name)
    if value is None:
        return ""
    import jsonschema  # only requests with tools pay for the import

    schema = dict(value.body)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise fields.error(name, f"is not a JSON schema: {e.message}" + (f" (at {where})" if where else "")) from None
    except RecursionError:
        raise fields.error(name, "is nested too deeply") from None
    return json.dumps(schema)


FUNCTION_SCHEMA = ObjectSchema(
    (
        Field("name", {"type": "string", "pattern": FUNCTION_NAME_PATTERN}, _read_name),
        string("description", doc="shown to the model"),
        Field("parameters", {"type": "object"}, _read_parameters, doc="a JSON schema; calls are constrained to it"),
        boolean("strict", doc="always on: every call's arguments follow the schema"),
    ),
    required=("name",),
)
TOOL_SCHEMA = ObjectSchema(
    (string("type", ("function",)), nested("function", FUNCTION_SCHEMA)), required=("type", "function")
)


def _read_tools(fields: Fields, name: str) -> list[pb.Tool]:
    items = fields.array(name)
    assert items is not None
    if len(items) > MAX_TOOLS:
        raise fields.error(name, f"at most {MAX_TOOLS} tools, got {len(items)}")
    tools = []
    for raw in fields.objects(name, items, "a tool object"):
        function = TOOL_SCHEMA.read(raw).value("function")
        tools.append(
            pb.Tool(
                name=function.value("name"),
                description=function.value("description", ""),
                parameters=function.value("parameters", ""),
            )
        )
    names = [t.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise fields.error(name, f"function names must be unique; {duplicate!r} appears twice")
    return tools


NAMED_CHOICE = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    },
    "required": ["type", "function"],
}


@dataclass(frozen=True)
class NamedFunction:
    """A tool_choice that names the one function to call."""

    name: str


def _read_tool_choice(fields: Fields, name: str) -> str | NamedFunction:
    """A mode ("auto", "none", "required") or the function named."""
    value = fields.raw(name)
    if isinstance(value, str) and value in TOOL_CHOICE_MODES:
        return value
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return NamedFunction(function["name"])
    raise fields.error(
        name, """must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}"""
    )


TOOL_FIELDS = (
    Field("tools", {"type": "array", "items": TOOL_SCHEMA.openapi(), "maxItems": MAX_TOOLS}, _read_tools,
          doc="function tools, rendered by the model's chat template"),
    Field("tool_choice", {"oneOf": [{"type": "string", "enum": list(TOOL_CHOICE_MODES)}, NAMED_CHOICE]},
          _read_tool_choice, doc="auto when tools are given and this is omitted"),
    boolean("parallel_tool_calls", doc="false: at most one call per choice (the server constrains the output)"),
)  # fmt: skip


def apply_tools(body: Body, request: pb.GenerateRequest, tools: Sequence[pb.Tool]) -> None:
    """Put `tools` (as the body gave them), its tool choice (auto when omitted) and parallel_tool_calls into the
    request; the server enforces all three. Without tools, a choice that asks for a call is a 400."""
    choice = body.value("tool_choice")
    if not tools:
        if choice is not None and choice not in ("auto", "none"):
            raise body.error("tool_choice", "asks for a tool call, but the request gives no tools")
        return
    request.tools.extend(tools)
    if isinstance(choice, NamedFunction):
        names = [t.name for t in tools]
        if choice.name not in names:
            raise body.error("tool_choice", f"{choice.name!r} is not one of the request's tools ({', '.join(names)})")
        request.tool_choice.function = choice.name
    else:
        request.tool_choice.mode = TOOL_CHOICE_MODES[choice or "auto"]
    if body.has("parallel_tool_calls"):
        request.parallel_tool_calls = body.value("parallel_tool_calls")


@dataclass
class _Told:
    """What the client has been told of one call."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class ChoiceToolCalls:
    """One choice's calls as the client sees them: deltas told once each, in the shape the OpenAI SDK accumulates
    (id, type and name on a call's first entry, then argument fragments), and the complete calls at the end."""

    told: dict[int, _Told] = field(default_factory=dict)
    complete: list[pb.ToolCall] = field(default_factory=list)

    def feed(self, deltas: Sequence[pb.ToolCallDelta], calls: Sequence[pb.ToolCall]) -> list[dict[str, Any]]:
        """The `tool_calls` entries of a stream chunk for one message: its deltas, then whatever of the complete
        calls (on a choice's last message) the deltas had not told yet. One entry per call."""
        entries: dict[int, dict[str, Any]] = {}
        for delta in deltas:
            self._tell(entries, delta.index, delta.id, delta.name, delta.arguments)
        for call in calls:
            self.complete.append(call)
            told = self.told.get(call.index)
            if told is None:
                self._tell(entries, call.index, call.id, call.name, call.arguments)
            elif call.arguments.startswith(told.arguments):
                self._tell(entries, call.index, call.id, call.name, call.arguments[len(told.arguments) :])
            else:  # a stream already told cannot be taken back; the non-streaming body uses the complete call
                logger.warning("call %d: complete arguments differ from the streamed ones", call.index)
        return [entries[i] for i in sorted(entries)]

    def _tell(self, entries: dict[int, dict[str, Any]], index: int, call_id: str, name: str, arguments: str) -> None:
        told = self.told.get(index)
        if told is None:
            told = self.told[index] = _Told(call_id or f"call_{uuid.uuid4().hex[:24]}", name)
            entries[index] = {"index": index, "id": told.id, "type": "function",
                              "function": {"name": name, "arguments": ""}}  # fmt: skip
        elif not arguments:
            return
        entry = entries.setdefault(index, {"index": index, "function": {"arguments": ""}})
        entry["function"]["arguments"] += arguments
        told.arguments += arguments

    def message(self) -> list[dict[str, Any]]:
        """The choice's calls for a non-streaming message: the complete ones (every one was fed, so each has its
        told id), else what the deltas told."""
        calls = {c.index: _Told(self.told[c.index].id, c.name, c.arguments) for c in self.complete} or self.told
        return [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for _, call in sorted(calls.items())
        ]
