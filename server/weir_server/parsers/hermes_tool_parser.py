"""Hermes-style calls (Qwen 2.5/3, Hermes, QwQ, and Weir's own rendering for templates that know no tools).

    I'll look that up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"zone": "CET"}}
    </tool_call>

Text before, between and after calls is content. Arguments stream as the model writes them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from weir_server.parsers import structural
from weir_server.parsers.json_scan import CallObjectReader
from weir_server.parsers.streaming import StreamingToolParser, partial_tag_len
from weir_server.parsers.tool_parser import ToolSpec, register_tool_parser

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
_SPACE_AND_BRACES = " \t\r\n}"


class _State(enum.Enum):
    TEXT = enum.auto()
    CALL = enum.auto()  # reading the call object
    CLOSING = enum.auto()  # the object is done; expecting </tool_call>
    SKIPPING = enum.auto()  # not a call object: up to </tool_call>, all of it content


@register_tool_parser("hermes")
class HermesToolParser(StreamingToolParser):
    """Calls as `<tool_call>` + a JSON object with "name" and "arguments" + `</tool_call>`, any number of them."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        super().__init__(tools)
        self._state = _State.TEXT
        self._reader = CallObjectReader()

    def _step(self, final: bool) -> None:
        while self._buffer or final:
            if self._state is _State.TEXT:
                if not self._emit_text_until(CALL_START, final):
                    return
                self._buffer = self._buffer[len(CALL_START) :]
                self._begin_call(CALL_START)
                self._reader = CallObjectReader()
                self._state = _State.CALL
            elif self._state is _State.CALL:
                if not self._read_call(self._reader):
                    return  # finish() closes a call cut off here
                self._state = _State.SKIPPING if self._reader.failed else _State.CLOSING
            elif self._state is _State.CLOSING:
                # Stray closing braces are a known slip of unconstrained models: part of the call, not content.
                self._consume(len(self._buffer) - len(self._buffer.lstrip(_SPACE_AND_BRACES)))
                if self._buffer.startswith(CALL_END):
                    self._consume(len(CALL_END))
                elif CALL_END.startswith(self._buffer):
                    if not final:
                        return
                    self._consume(len(self._buffer))  # cut off inside the end tag
                # A missing </tool_call> does not spoil a complete call object: what follows is content.
                self._close_call(self._reader.arguments())
                self._state = _State.TEXT
            else:
                at = self._buffer.find(CALL_END)
                if at < 0 and not final:
                    self._consume(len(self._buffer) - partial_tag_len(self._buffer, CALL_END))
                    return
                self._consume(len(self._buffer) if at < 0 else at + len(CALL_END))
                self._close_call(None)
                self._state = _State.TEXT

    @classmethod
    def structural_tag(
        cls,
        tools: Sequence[ToolSpec],
        mode: str,
        forced: str | None = None,
        reasoning_prefix: dict[str, Any] | None = None,
        parallel: bool = True,
    ) -> dict[str, Any] | None:
        """auto: `triggered_tags` on "<tool_call>", one tag per tool; required: `tags_with_separator` ("\\n")."""
        chosen = structural.call_tools(tools, mode, forced)
        if chosen is None:
            return None
        tags = [
            structural.call_tag(tool, CALL_START + '\n{"name": ', ', "arguments": ', "}\n" + CALL_END)
            for tool in chosen
        ]
        if forced is not None:
            body = tags[0]
        elif mode == "required":
            body = structural.separated(tags, "\n", parallel)
        else:
            body = structural.triggered([CALL_START], tags, parallel)
        return structural.structural_tag(body, reasoning_prefix)

    @classmethod
    def matches_template(cls, chat_template: str) -> bool:
        """Templates that show calls inside <tool_call> tags."""
        return CALL_START in chat_template
