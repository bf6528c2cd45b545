"""A JSON list of call objects, each streamed as it is read: Mistral's list form and the generic json parser."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from weir_server.parsers.json_scan import CallObjectReader
from weir_server.parsers.streaming import StreamingToolParser
from weir_server.parsers.tool_parser import ToolSpec


class CallListToolParser(StreamingToolParser, abc.ABC):
    """Adds `_start_list` / `_step_list` to a format whose calls may come as `[{...}, {...}]`.

    The list's own syntax ("[", ", ", "]") is not content once a call in it counts; before an element that is
    not a call object it is, as is that element and what follows.
    """

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        super().__init__(tools)
        self._framing = ""  # list syntax read since the last call: the next call's opener
        self._element: CallObjectReader | None = None
        self._calls_before_list = 0

    def _start_list(self, opener_len: int) -> None:
        """The list opens with the first `opener_len` characters of the buffer (its "[" last)."""
        self._framing, self._buffer = self._buffer[:opener_len], self._buffer[opener_len:]
        self._element = None
        self._calls_before_list = len(self._calls)

    def _step_list(self, final: bool) -> bool:
        """Read list elements; True once the list is over (what is left in the buffer is after it)."""
        while True:
            element = self._element
            if element is not None:
                if not self._read_call(element):
                    return False  # finish() closes a call cut off here
                self._close_call(element.arguments())
                self._element = None
                if element.failed:
                    return True
                continue
            rest = self._buffer.lstrip()
            if not rest:
                if final:
                    self._emit_text(self._framing + self._buffer)
                    self._buffer = ""
                return final
            space = len(self._buffer) - len(rest)
            if rest[0] == "{":
                self._begin_call(self._framing + self._buffer[:space])
                self._framing, self._buffer = "", rest
                self._element = CallObjectReader()
            elif rest[0] == ",":
                self._framing += self._buffer[: space + 1]
                self._buffer = self._buffer[space + 1 :]
            else:
                if rest[0] == "]" and len(self._calls) > self._calls_before_list:
                    self._buffer = self._buffer[space + 1 :]
                else:  # a list of no calls, or not of calls: its syntax is content
                    self._emit_text(self._framing)
                self._framing = ""
                return True
