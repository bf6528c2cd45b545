"""The tools of a request: each function's checked schema, and whether the output must, may or must not call one."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from weir_server.errors import InvalidRequestError
from weir_server.parsers.tool_parser import ToolSpec

TOOL_CHOICE_MODES = ("auto", "none", "required")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's rule, with dots as vLLM allows
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_OBJECT_KEYWORDS = ("properties", "required", "additionalProperties", "patternProperties", "$ref", "allOf", "anyOf")


@dataclass(frozen=True)
class RawTool:
    """A tool as the request gave it; `parameters` is JSON text (empty = no parameters)."""

    name: str
    description: str = ""
    parameters: str = ""


@dataclass(frozen=True)
class ToolRequest:
    """The request's tools and its choice: `auto` (the model decides), `none` (text only; the tools are still shown
    to the template) or `required` (one or more calls; with `forced`, exactly one call of that function)."""

    tools: tuple[ToolSpec, ...]
    mode: str = "auto"
    forced: str | None = None
    parallel: bool = True  # several calls per choice

    @property
    def calls_allowed(self) -> bool:
        return self.mode != "none"


def tool_request(
    tools: Sequence[RawTool], mode: str | None, forced: str | None, parallel: bool = True
) -> ToolRequest | None:
    """Check the request's tools and choice; None when it has no tools. Raises InvalidRequestError naming the field.
    How many tools and how large is admission's to check (api/admission.py), before this work."""
    if not tools:
        if forced or mode == "required":
            raise InvalidRequestError("tool_choice", "asks for a tool call, but the request gives no tools")
        return None
    specs = tuple(_tool_spec(i, tool) for i, tool in enumerate(tools))
    names = [spec.name for spec in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidRequestError("tools", f"function names must be unique; {duplicate!r} appears twice")
    if forced:
        if forced not in names:
            known = ", ".join(names)
            raise InvalidRequestError("tool_choice.function", f"{forced!r} is not one of the tools ({known})")
        return ToolRequest(specs, "required", forced, parallel)
    mode = mode or "auto"
    if mode not in TOOL_CHOICE_MODES:
        raise InvalidRequestError("tool_choice.mode", f"must be one of {', '.join(TOOL_CHOICE_MODES)}, got {mode!r}")
    return ToolRequest(specs, mode, parallel=parallel)


def _tool_spec(index: int, tool: RawTool) -> ToolSpec:
    field = f"tools[{index}]"
    if not _FUNCTION_NAME.fullmatch(tool.name):
        raise InvalidRequestError(f"{field}.name", "must be 1-64 letters, digits, underscores, dots or dashes")
    return ToolSpec(tool.name, tool.description, _parameters(tool.parameters, f"{field}.parameters"))


def _describes_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind is not None:
        return kind == "object" or (isinstance(kind, list) and "object" in kind)
    return not schema or any(key in schema for key in _OBJECT_KEYWORDS)


def _parameters(text: str, field: str) -> dict[str, Any]:
    """The parameters' JSON schema: an object that is a valid schema (of any draft jsonschema knows)."""
    if not text.strip():
        return dict(_NO_PARAMETERS)
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidRequestError(field, f"is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(field, "must be a JSON schema object")
    if not _describes_object(schema):
        # Arguments are keyword arguments: templates and parsers read them as an object, as OpenAI requires.
        raise InvalidRequestError(field, f"must describe an object (type: object), got {schema.get('type', schema)!r}")
    import jsonschema  # only requests with tools pay for the import

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        at = f" (at {where})" if where else ""
        raise InvalidRequestError(field, f"is not a JSON schema: {e.message}{at}") from None
    except RecursionError:
        raise InvalidRequestError(field, "is nested too deeply") from None
    return schema
