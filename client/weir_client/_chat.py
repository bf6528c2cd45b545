"""generate()'s chat keywords in OpenAI's shapes (messages, tools, tool_choice, chat_template_kwargs) and its
output constraint, as weir.v1 request fields. Only shapes are checked here; the server checks what they say."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from weir.v1 import inference_pb2 as pb
from weir_client.errors import WeirClientError
from weir_client.types import OutputOptions, ToolCall

CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
_TOOL_CHOICE_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
_error = WeirClientError.invalid_argument


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[pb.ChatMessage]:
    """The turns of a conversation, oldest first."""
    return [chat_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def chat_message(message: Mapping[str, Any], where: str) -> pb.ChatMessage:
    """One turn: role, content (text or a list of text parts), an assistant's tool_calls, a tool result's
    tool_call_id, and name. Keys the proto has no field for (refusal, audio...) are left out."""
    if not isinstance(message, Mapping):
        raise _error(where, f"must be a dict with role and content, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise _error(f"{where}.role", "is required")
    result = pb.ChatMessage(
        role=role,
        tool_call_id=_optional_text(message.get("tool_call_id"), f"{where}.tool_call_id"),
        name=_optional_text(message.get("name"), f"{where}.name"),
    )
    content = message.get("content")
    if isinstance(content, str):
        result.content = content
    elif isinstance(content, Sequence):
        result.content_parts.extend(_content_part(part, f"{where}.content[{j}]") for j, part in enumerate(content))
    elif content is not None:
        raise _error(f"{where}.content", f"must be a string or a list of text parts, got {type(content).__name__}")
    calls = message.get("tool_calls") or ()
    result.tool_calls.extend(_tool_call(call, j, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls))
    return result


def _content_part(part: Any, where: str) -> pb.ContentPart:
    if not isinstance(part, Mapping) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
        raise _error(where, f'only text parts ({{"type": "text", "text": ...}}) are supported, got {part!r}')
    return pb.ContentPart(text=part["text"])


def _tool_call(call: Any, index: int, where: str) -> pb.ToolCall:
    """An assistant's call: OpenAI's {"id", "type": "function", "function": {"name", "arguments"}}, the same
    without the "function" level, or a ToolCall this client returned."""
    if isinstance(call, ToolCall):
        return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments, index=index)
    if not isinstance(call, Mapping):
        raise _error(where, f"must be a dict with id and function, got {type(call).__name__}")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise _error(f"{where}.function.name", "is required")
    arguments = function.get("arguments")
    return pb.ToolCall(
        id=_optional_text(call.get("id"), f"{where}.id"),
        name=name,
        arguments="{}" if arguments is None else json_text(arguments, f"{where}.function.arguments"),
        index=index,
    )


def apply_output_options(request: pb.GenerateRequest, options: OutputOptions) -> None:
    """Set the tools, tool choice, template variables and constraint that are given (None means not given)."""
    tools = options.get("tools")
    if tools is not None:
        request.tools.extend(tool(t, f"tools[{i}]") for i, t in enumerate(tools))
    choice = options.get("tool_choice")
    if choice is not None:
        request.tool_choice.CopyFrom(tool_choice(choice))
    kwargs = options.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            raise _error("chat_template_kwargs", f"must be a dict, got {type(kwargs).__name__}")
        request.chat_template_kwargs = json_text(kwargs, "chat_template_kwargs")
    set_constraint(request, options)


def tool(spec: Any, where: str) -> pb.Tool:
    """A function the model may call: OpenAI's {"type": "function", "function": {"name", "description",
    "parameters"}} or the inner dict alone; `parameters` a JSON Schema as a dict or JSON text."""
    if not isinstance(spec, Mapping):
        raise _error(where, f"must be a dict, got {type(spec).__name__}")
    function: Any = spec
    if "function" in spec or "type" in spec:
        if spec.get("type", "function") != "function":
            raise _error(f"{where}.type", f"only function tools are supported, got {spec.get('type')!r}")
        where, function = f"{where}.function", spec.get("function")
        if not isinstance(function, Mapping):
            raise _error(where, "must be a dict with name, description and parameters")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _error(f"{where}.name", "is required")
    parameters = function.get("parameters")
    return pb.Tool(
        name=name,
        description=_optional_text(function.get("description"), f"{where}.description"),
        parameters="" if parameters is None else json_text(parameters, f"{where}.parameters"),
    )


def tool_choice(choice: str | Mapping[str, Any]) -> pb.ToolChoice:
    """A mode ("auto", "none", "required"), a function's name, or OpenAI's {"type": "function", "function":
    {"name"}} (the only way to name a function called auto, none or required)."""
    if isinstance(choice, str) and choice:
        mode = _TOOL_CHOICE_MODES.get(choice)
        return pb.ToolChoice(mode=mode) if mode is not None else pb.ToolChoice(function=choice)
    if isinstance(choice, Mapping):
        function = choice.get("function", choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and name:
            return pb.ToolChoice(function=name)
    raise _error(
        "tool_choice",
        f'must be auto, none, required, a function name or {{"type": "function", "function": {{"name": ...}}}}; '
        f"got {choice!r}",
    )


def set_constraint(request: pb.GenerateRequest, options: OutputOptions) -> None:
    """Set the one output constraint given, if any (json_object=False counts as not given)."""
    given = [name for name in CONSTRAINTS if options.get(name) is not None and options.get(name) is not False]
    if len(given) > 1:
        raise _error("constraint", f"set at most one of {', '.join(CONSTRAINTS)}; got {', '.join(given)}")
    if not given:
        return
    name = given[0]
    value: Any = options.get(name)
    if name == "json_schema":
        request.json_schema = json_text(value, name)
    elif name == "json_object":
        request.json_object = True
    elif name == "choice":
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise _error(name, f"must be a list of strings, got {value!r}")
        request.choice.values.extend(value)
    elif isinstance(value, str):
        setattr(request, name, value)
    else:
        raise _error(name, f"must be a string, got {type(value).__name__}")


def json_text(value: Any, field: str) -> str:
    """JSON text as given, or a dict (or list) serialized."""
    if isinstance(value, str):
        return value
    if not isinstance(value, (Mapping, list, tuple)):
        raise _error(field, f"must be JSON text or a dict, got {type(value).__name__}")
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise _error(field, f"is not JSON-serializable: {e}") from e


def _optional_text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _error(field, f"must be a string, got {type(value).__name__}")
    return value
