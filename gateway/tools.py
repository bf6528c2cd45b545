"""Tool calls by constrained decoding: `tools` and a forced `tool_choice` become a JSON schema, the output calls."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from weir_gateway.validation import Fields

TOOL_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# With several tools the output is {"name": ..., "arguments": ...}, name first (xgrammar keeps schema order).
_CALL_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_CLOSING = re.compile(r"[\s}]*$")


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    parameters: dict[str, Any]  # a JSON schema


@dataclass(frozen=True)
class ToolPlan:
    """The tools of a request whose output must be a call: of `forced` alone, or of any (`required`)."""

    tools: tuple[Tool, ...]
    forced: str | None

    def schema(self) -> dict[str, Any]:
        """The constraint: the forced function's parameters, or an anyOf of {"name": const, "arguments": params}."""
        if self.forced is not None:
            return next(t.parameters for t in self.tools if t.name == self.forced)
        return {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"],
                }
                for t in self.tools
            ]
        }


def parse_tools(fields: Fields) -> ToolPlan | None:
    """The request's tool plan; None when it has no tools or `tool_choice` is "none" (tools are ignored)."""
    fields.boolean("parallel_tool_calls")  # one call per choice either way
    items = fields.array("tools")
    choice = fields.raw("tool_choice")
    if not items:
        if items is not None:
            raise fields.error("tools", "must hold at least one tool")
        if choice is not None and choice != "none":
            raise fields.error("tool_choice", "requires `tools`")
        return None
    tools = tuple(_tool(fields, i, item) for i, item in enumerate(items))
    names = [t.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise fields.error("tools", f"function names must be unique; {duplicate!r} appears twice")
    if choice == "none":
        return None
    if choice == "required":
        return ToolPlan(tools, None)
    if choice is None or choice == "auto":
        raise fields.error(
            "tool_choice", "'auto' is not supported by Weir yet; set it to 'required', 'none' or a named function"
        )
    if isinstance(choice, dict):
        named = Fields(choice, prefix="tool_choice.")
        named.reject_unknown(frozenset({"type", "function"}))
        if named.string("type") != "function":
            raise named.error("type", "must be 'function'")
        function = named.object_fields("function")
        name = function.string("name") if function is not None else None
        if function is None or name is None:
            raise named.error("function", "must name the function: {'name': ...}")
        if name not in names:
            raise function.error("name", f"{name!r} is not one of the request's tools ({', '.join(names)})")
        return ToolPlan(tools, name)
    raise fields.error("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {...}}")


def _tool(fields: Fields, index: int, item: Any) -> Tool:
    if not isinstance(item, dict):
        raise fields.error(f"tools[{index}]", "expected a tool object")
    tool = Fields(item, prefix=f"tools[{index}].")
    tool.reject_unknown(frozenset({"type", "function"}))
    if tool.string("type") != "function":
        raise tool.error("type", "must be 'function'")
    function = tool.object_fields("function")
    if function is None:
        raise tool.error("function", "required")
    function.reject_unknown(frozenset({"name", "description", "parameters", "strict"}))
    name = function.string("name")
    if name is None or not _FUNCTION_NAME.match(name):
        raise function.error("name", "required: 1-64 letters, digits, underscores or dashes")
    function.string("description")
    function.boolean("strict")  # the arguments always follow the schema
    parameters = function.raw("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise function.error("parameters", "expected a JSON schema object")
    return Tool(name, parameters if parameters is not None else _NO_PARAMETERS)


@dataclass(frozen=True)
class ToolCallDelta:
    """New output of one call: its header (id, name) once, then pieces of its arguments' JSON text."""

    call_id: str | None
    name: str | None
    arguments: str

    def as_json(self) -> dict[str, Any]:
        """The OpenAI `tool_calls[]` entry of a stream chunk."""
        entry: dict[str, Any] = {"index": 0}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.call_id is not None:
            entry |= {"id": self.call_id, "type": "function"}
            function = {"name": self.name} | function
        return entry | {"function": function}


class ToolCallParser:
    """Reads one choice's constrained output as it streams and tells its call in deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.name: str | None = plan.forced
        self.arguments = ""  # all argument text told so far
        self._pending = ""  # text not told yet: an incomplete head, or what may be the wrapper's closing brace
        self._header_sent = False

    def feed(self, text: str, finish_reason: str | None = None) -> ToolCallDelta | None:
        """Take new output text (and, on the choice's last message, why it ended); return what of the call
        can be told now. Text before the function's name is known is held back."""
        self._pending += text
        if not self._read_head():
            return None
        ready = self._pending
        if self.plan.forced is None:
            if finish_reason == "stop":  # complete: the last `}` closes the {"name", "arguments"} wrapper
                ready = ready.rstrip()
                ready = ready[:-1].rstrip() if ready.endswith("}") else ready
            elif finish_reason is None:  # a trailing `}` may close the wrapper rather than the arguments
                closing = _CLOSING.search(ready)
                ready = ready[: closing.start()] if closing else ready
        self._pending = "" if finish_reason is not None else self._pending[len(ready) :]
        return self._delta(ready)

    def _read_head(self) -> bool:
        """Whether the function's name is known, parsing the head of the output once it is complete."""
        if self.name is None and (match := _CALL_HEAD.match(self._pending)) is not None:
            self.name = json.loads(match.group(1))
            self._pending = self._pending[match.end() :]
        return self.name is not None

    def _delta(self, arguments: str) -> ToolCallDelta | None:
        if not self.arguments:  # whitespace between the wrapper's `"arguments":` and the value
            arguments = arguments.lstrip()
        header = not self._header_sent
        if not arguments and not header:
            return None
        self._header_sent = True
        self.arguments += arguments
        return ToolCallDelta(self.call_id if header else None, self.name if header else None, arguments)

    def message(self) -> dict[str, Any]:
        """The finished call as a chat message's `tool_calls` entry."""
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
