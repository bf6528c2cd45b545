"""Llama 3.1 / 3.2 JSON calls: the output is the calls, optionally after `<|python_tag|>`, separated by "; ".

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

"arguments" is read like "parameters". Output that does not open with a call object is all content; text
after the last call is content too. `<|python_tag|>` is a special token: the detokenizer must keep it for the
parser to see it (without it the bare JSON still parses).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import Any

from weir_server.parsers import structural
from weir_server.parsers.json_scan import CallObjectReader
from weir_server.parsers.streaming import StreamingToolParser
from weir_server.parsers.tool_parser import ToolSpec, register_tool_parser

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = "; "


class _State(enum.Enum):
    START = enum.auto()  # does the output open with a call?
    CALL = enum.auto()
    BETWEEN = enum.auto()  # after a call: another one, or the end
    TEXT = enum.auto()  # all the rest is content


def find_call_opener(text: str, *, separator: bool) -> int | None:
    """Where the `{` of a next call object is in `text`, -1 if text can still become an opener, else None.

    An opener is whitespace, then (when `separator`) an optional ";", then an optional python tag, then "{".
    """
    i = len(text) - len(text.lstrip())
    if separator and text[i : i + 1] == ";":
        i += 1
        i += len(text[i:]) - len(text[i:].lstrip())
    rest = text[i:]
    if rest.startswith(PYTHON_TAG):
        i += len(PYTHON_TAG)
        i += len(text[i:]) - len(text[i:].lstrip())
        rest = text[i:]
    if rest.startswith("{"):
        return i
    return -1 if PYTHON_TAG.startswith(rest) else None


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(StreamingToolParser):
    """Calls as JSON objects `{"name": ..., "parameters": {...}}` that make up the whole output."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        super().__init__(tools)
        self._state = _State.START
        self._reader = CallObjectReader()

    def _step(self, final: bool) -> None:
        while self._buffer or final:
            if self._state in (_State.START, _State.BETWEEN):
                at = find_call_opener(self._buffer, separator=self._state is _State.BETWEEN)
                if at == -1 and not final:
                    return
                if at is None or at == -1:
                    self._state = _State.TEXT
                    continue
                opener, self._buffer = self._buffer[:at], self._buffer[at:]
                self._begin_call(opener)
                self._reader = CallObjectReader()
                self._state = _State.CALL
            elif self._state is _State.CALL:
                if not self._read_call(self._reader):
                    return
                self._close_call(self._reader.arguments())
                # After a call that is not JSON after all, the rest is content too.
                self._state = _State.TEXT if self._reader.failed else _State.BETWEEN
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
        """Calls `{"name": NAME, "parameters": ` + schema + `}` joined by "; "; in auto mode, or free text that
        does not start with "{" or whitespace and never holds the python tag."""
        chosen = structural.call_tools(tools, mode, forced)
        if chosen is None:
            return None
        tags = [structural.call_tag(tool, '{"name": ', ', "parameters": ', "}") for tool in chosen]
        calls = tags[0] if forced is not None else structural.separated(tags, SEPARATOR, parallel)
        body = structural.sequence(structural.optional(structural.const(PYTHON_TAG)), calls)
        if mode == "auto" and forced is None:
            # The python tag may also arrive in pieces ("<" then "|python_tag|>"), so both are kept out.
            text = structural.free_text_not_starting_with("{", excludes=[PYTHON_TAG, PYTHON_TAG[1:]])
            body = structural.any_of([body, text])
        return structural.structural_tag(body, reasoning_prefix)

    @classmethod
    def matches_template(cls, chat_template: str) -> bool:
        """Llama 3.1/3.2 templates: the python tag, or JSON calls with a "parameters" key."""
        return PYTHON_TAG in chat_template or re.search(r'\{"name":.{0,80}"parameters"', chat_template) is not None
