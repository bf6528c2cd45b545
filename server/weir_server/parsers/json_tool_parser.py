"""The generic fallback: the whole output is one call object or a list of them, bare or in a ```json fence.

    ```json
    [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]
    ```

Output that does not open with a call (or a fence holding one) is all content; text after it is content too.
No chat template asks for it by name, so `matches_template` is never true: it is chosen explicitly.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from weir_server.parsers import structural
from weir_server.parsers.call_list import CallListToolParser
from weir_server.parsers.json_scan import CallObjectReader
from weir_server.parsers.tool_parser import ToolSpec, register_tool_parser

FENCE = "```"
_FENCE_LANGUAGES = ("", "json")


class _State(enum.Enum):
    START = enum.auto()  # does the output open with a call, a list of calls or a fence?
    CALL = enum.auto()
    LIST = enum.auto()
    CLOSING = enum.auto()  # after the calls: the closing fence, if one opened
    TEXT = enum.auto()


def find_json_opener(text: str) -> tuple[int, bool] | None:
    """Where the `{` or `[` that opens the calls is in `text`, and whether a fence came first.

    (-1, False) while `text` may still become an opener; None when it cannot.
    """
    rest = text.lstrip()
    if rest[:1] in ("{", "["):
        return len(text) - len(rest), False
    if not rest.startswith(FENCE):
        return (-1, False) if FENCE.startswith(rest) else None
    newline = rest.find("\n")
    if newline < 0:
        return -1, False
    if rest[len(FENCE) : newline].strip().lower() not in _FENCE_LANGUAGES:
        return None
    body = rest[newline + 1 :].lstrip()
    if not body:
        return -1, False
    return (len(text) - len(body), True) if body[0] in "{[" else None


@register_tool_parser("json")
class JsonToolParser(CallListToolParser):
    """Calls as `{"name": ..., "arguments": {...}}` ("parameters" too), or a list of them, as the whole output."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        super().__init__(tools)
        self._state = _State.START
        self._fenced = False
        self._reader = CallObjectReader()

    def _step(self, final: bool) -> None:
        while self._buffer or final:
            if self._state is _State.START:
                found = find_json_opener(self._buffer)
                if found is not None and found[0] == -1 and not final:
                    return
                if found is None or found[0] == -1:
                    self._state = _State.TEXT
                    continue
                at, self._fenced = found
                if self._buffer[at] == "[":
                    self._start_list(at + 1)
                    self._state = _State.LIST
                else:
                    self._begin_call(self._buffer[:at])
                    self._buffer = self._buffer[at:]
                    self._reader = CallObjectReader()
                    self._state = _State.CALL
            elif self._state is _State.CALL:
                if not self._read_call(self._reader):
                    return
                self._close_call(self._reader.arguments())
                self._state = _State.CLOSING if self._reader.done else _State.TEXT
            elif self._state is _State.LIST:
                if not self._step_list(final):
                    return
                self._state = _State.CLOSING
            elif self._state is _State.CLOSING:
                rest = self._buffer.lstrip()
                if self._fenced and not final and FENCE.startswith(rest):
                    return
                if self._fenced and rest.startswith(FENCE):
                    self._buffer = rest[len(FENCE) :]
                self._state = _State.TEXT
            else:
                self._emit_text(self._buffer)
                self._buffer = ""
                return

    @classmethod
    def structural_tag(
        cls,
        tools: Sequence[ToolSpec],
        mode: str,
        forced: str | None = None,
        reasoning_prefix: dict[str, Any] | None = None,
        parallel: bool = True,
    ) -> dict[str, Any] | None:
        """One call object or a list of them; in auto mode, or free text that starts with none of whitespace,
        "{", "[" or a backtick (so a fenced call, which the parser accepts, cannot escape the schema)."""
        chosen = structural.call_tools(tools, mode, forced)
        if chosen is None:
            return None
        tags = [structural.call_tag(tool, '{"name": ', ', "arguments": ', "}") for tool in chosen]
        if forced is not None:
            return structural.structural_tag(tags[0], reasoning_prefix)
        calls = list(tags)
        if parallel:
            calls.append({"type": "tag", "begin": "[", "content": structural.separated(tags, ", "), "end": "]"})
        if mode == "auto":
            calls.append(structural.free_text_not_starting_with("{[`"))
        return structural.structural_tag(structural.any_of(calls), reasoning_prefix)

    @classmethod
    def matches_template(cls, chat_template: str) -> bool:
        """Never: the fallback is chosen by name."""
        return False
