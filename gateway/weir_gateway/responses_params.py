"""The settings of a /v1/responses request as table fields (weir_gateway.schema): function tools, tool choice,
`text.format` and the accepted extras, each read into its weir.v1 form and into what the response repeats."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from weir.v1 import inference_pb2 as pb
from weir_gateway import tools as chat_tools
from weir_gateway.schema import Body, Field, ObjectSchema, any_object, boolean, string
from weir_gateway.tools import FUNCTION_SCHEMA, MAX_TOOLS, TOOL_CHOICE_MODES, NamedFunction
from weir_gateway.validation import Fields

MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits

# Responses spells a function tool flat: {"type": "function", "name", ...} rather than chat's {"function": {...}}.
TOOL_SCHEMA = ObjectSchema((string("type", ("function",)), *FUNCTION_SCHEMA.fields), required=("type", "name"))


@dataclass(frozen=True)
class FunctionTool:
    """A tool as the server takes it and as the response repeats it."""

    proto: pb.Tool
    echoed: dict[str, Any]


def _read_tools(fields: Fields, name: str) -> list[FunctionTool]:
    items = fields.array(name)
    assert items is not None
    if len(items) > MAX_TOOLS:
        raise fields.error(name, f"at most {MAX_TOOLS} tools, got {len(items)}")
    tools: list[FunctionTool] = []
    for raw in fields.objects(name, items, "a tool object"):
        kind = raw.string("type")
        if kind != "function":  # checked first: a built-in tool's other fields are beside the point
            raise raw.error("type", f"only 'function' tools are supported (Weir runs no built-in tools), got {kind!r}")
        tool = TOOL_SCHEMA.read(raw)
        function = tool.value("name")
        if any(t.proto.name == function for t in tools):
            raise tool.error("name", f"function names must be unique; {function!r} appears twice")
        proto = pb.Tool(
            name=function, description=tool.value("description", ""), parameters=tool.value("parameters", "")
        )
        echoed = {"type": "function", "name": function, "description": tool.value("description"),
                  "parameters": raw.raw("parameters"), "strict": tool.value("strict", True)}  # fmt: skip
        tools.append(FunctionTool(proto, echoed))
    return tools


NAMED_CHOICE_SCHEMA = ObjectSchema((string("type", ("function",)), string("name")), required=("type", "name"))


def _read_tool_choice(fields: Fields, name: str) -> str | NamedFunction:
    value = fields.raw(name)
    if isinstance(value, str) and value in TOOL_CHOICE_MODES:
        return value
    if isinstance(value, dict):
        return NamedFunction(NAMED_CHOICE_SCHEMA.read(Fields(value, prefix=f"{fields.param(name)}.")).value("name"))
    raise fields.error(name, """must be "auto", "none", "required" or {"type": "function", "name": ...}""")


def apply_tools(body: Body, request: pb.GenerateRequest) -> tuple[list[dict[str, Any]], str | dict[str, str]]:
    """Put the tools, tool choice and parallel_tool_calls into the request, as chat does; return the tools and the
    choice as the response repeats them."""
    tools: list[FunctionTool] = body.value("tools", [])
    chat_tools.apply_tools(body, request, [t.proto for t in tools])
    choice = body.value("tool_choice")
    echoed_choice = {"type": "function", "name": choice.name} if isinstance(choice, NamedFunction) else choice
    return [t.echoed for t in tools], echoed_choice or "auto"


TOOL_FIELDS = (
    Field("tools", {"type": "array", "items": TOOL_SCHEMA.openapi(), "maxItems": MAX_TOOLS}, _read_tools,
          doc="function tools (built-in tools are a 400), rendered by the model's chat template"),
    Field("tool_choice", {"oneOf": [{"type": "string", "enum": list(TOOL_CHOICE_MODES)},
                                    NAMED_CHOICE_SCHEMA.openapi()]},
          _read_tool_choice, doc="auto when tools are given and this is omitted"),
    boolean("parallel_tool_calls", doc="false: at most one call (the server constrains the output)"),
)  # fmt: skip

# ---- text.format ---------------------------------------------------------------------------------------------

FORMATS = {
    "text": ObjectSchema((string("type", ("text",)),), required=("type",)),
    "json_object": ObjectSchema((string("type", ("json_object",)),), required=("type",)),
    "json_schema": ObjectSchema(
        (string("type", ("json_schema",)), string("name"), any_object("schema", doc="the output follows it"),
         string("description"), boolean("strict", doc="always on: the output follows the schema")),
        required=("type", "name", "schema"),
    ),
}  # fmt: skip


def _read_format(fields: Fields, name: str) -> Body:
    spec = fields.object_fields(name)
    assert spec is not None
    kind = spec.string("type")
    if kind not in FORMATS:
        raise spec.error("type", f"must be one of {', '.join(map(repr, FORMATS))}, got {kind!r}")
    return FORMATS[kind].read(spec)


TEXT_SCHEMA = ObjectSchema(
    (Field("format", {"oneOf": [f.openapi() for f in FORMATS.values()]}, _read_format,
           doc="json_object and json_schema constrain the output"),
     string("verbosity", ("low", "medium", "high"), doc="a hint Weir's models take no notice of")),
)  # fmt: skip


def apply_text_format(body: Body, request: pb.GenerateRequest) -> tuple[dict[str, Any], str | None]:
    """Set the request's constraint from `text.format`; return the `text` the response repeats and the body field
    the server's complaints about the constraint should name (None for free text)."""
    text: Body | None = body.value("text")
    spec: Body | None = text.value("format") if text is not None else None
    if spec is None or spec.value("type") == "text":
        return {"format": {"type": "text"}}, None
    if spec.value("type") == "json_object":
        request.json_object = True
        return {"format": {"type": "json_object"}}, "text.format"
    request.json_schema = json.dumps(spec.value("schema"))
    echoed = {k: spec.value(k) for k in ("type", "name", "schema", "description", "strict")}
    return {"format": echoed}, "text.format.schema"


# ---- fields repeated back or accepted ------------------------------------------------------------------------


def _read_metadata(fields: Fields, name: str) -> dict[str, str]:
    metadata = fields.object_fields(name)
    assert metadata is not None
    if len(metadata.body) > MAX_METADATA_KEYS:
        raise fields.error(name, f"at most {MAX_METADATA_KEYS} keys, got {len(metadata.body)}")
    for key, value in metadata.body.items():
        if len(key) > MAX_METADATA_KEY:
            raise fields.error(name, f"keys are at most {MAX_METADATA_KEY} characters, got {key[:20]!r}...")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise metadata.error(key, f"expected a string of at most {MAX_METADATA_VALUE} characters")
    return dict(metadata.body)


def _read_truncation(fields: Fields, name: str) -> str:
    value = fields.string(name)
    if value != "disabled":
        raise fields.error(name, f"only 'disabled' is supported (a prompt over the context is a 400), got {value!r}")
    return value


def _read_background(fields: Fields, name: str) -> bool:
    if fields.boolean(name):
        raise fields.error(name, "not supported by Weir (background responses)")
    return False


METADATA_FIELD = Field(
    "metadata",
    {"type": "object", "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
     "maxProperties": MAX_METADATA_KEYS},
    _read_metadata, doc="up to 16 string pairs, repeated in the response",
)  # fmt: skip
TRUNCATION_FIELD = Field("truncation", {"type": "string", "enum": ["disabled"]}, _read_truncation,
                         doc="only 'disabled': a prompt over the context is a 400")  # fmt: skip
BACKGROUND_FIELD = Field("background", {"type": "boolean", "enum": [False]}, _read_background, doc="only false")
