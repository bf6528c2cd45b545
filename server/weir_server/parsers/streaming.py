"""The machinery the tool parsers share: a text buffer stepped by a format's state machine, content with the
whitespace around calls dropped, and calls opened, streamed and closed with their deltas.

A format parser implements `_step(final)`: consume what it can from `self._buffer` (keeping back what may
still become a tag), calling `_emit_text` for content and `_begin_call` / `_stream` / `_close_call` for calls.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from weir_server.parsers.tool_parser import ParsedDelta, ToolCall, ToolCallDelta, ToolParser, ToolSpec, new_call_id


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (what to keep back for now)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class CallReader(Protocol):
    """What `_stream` needs of a reader of one call's JSON (see json_scan)."""

    name: str | None
    done: bool
    failed: bool

    def feed(self, text: str) -> int: ...

    def take_arguments(self) -> str: ...

    def arguments(self) -> str | None: ...


@dataclass
class _PendingCall:
    raw: str  # the call's text so far, the content it becomes if it turns out invalid
    index: int | None = None  # set once the call streams (its name is a tool)
    id: str = ""
    name: str = ""
    streamed: str = ""  # argument text sent so far


class StreamingToolParser(ToolParser):
    """Base of the format parsers: feed/finish around `_step`, and the bookkeeping of content and calls."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        super().__init__(tools)
        self._buffer = ""
        self._call: _PendingCall | None = None
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._held_space = ""  # trailing whitespace of content: dropped if a call follows
        self._after_call = False  # no content since the last call closed
        self._next_index = 0

    def feed(self, text: str) -> ParsedDelta:
        """Read the next piece of generated text."""
        self._buffer += text
        self._step(final=False)
        return self._take()

    def finish(self) -> ParsedDelta:
        """The output ended: flush held-back text as content and close a pending call."""
        self._step(final=True)
        if self._call is not None:  # the output ended inside a call (max_tokens, a stop string)
            self._consume(len(self._buffer))
            if self._call.index is None:
                self._close_call(None)  # never told as a call: its text is content
            else:
                # Its id, name and arguments were streamed: repeating them as content would tell the output twice.
                # The unfinished call is not listed in `calls`; the finish reason says the output was cut.
                self._call = None
        if self._buffer:
            self._emit_text(self._buffer)
            self._buffer = ""
        if not self._after_call:
            self._content.append(self._held_space)
        self._held_space = ""
        return self._take()

    @abc.abstractmethod
    def _step(self, final: bool) -> None:
        """Consume what the buffer allows; `final` when no more text will come."""

    def _emit_text(self, text: str) -> None:
        """Content. Its trailing whitespace waits: it goes out before more text, but not before a call, nor
        at the end of an output whose last part is a call."""
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body) :]
        if body:
            self._content.append(body)
            self._after_call = False

    def _emit_text_until(self, tag: str, final: bool) -> bool:
        """Content up to `tag`: True with the buffer now at the tag; False when it has not come (the start of
        it at the end of the buffer is kept back unless `final`)."""
        at = self._buffer.find(tag)
        if at < 0:
            at = len(self._buffer) - (0 if final else partial_tag_len(self._buffer, tag))
        self._emit_text(self._buffer[:at])
        self._buffer = self._buffer[at:]
        return self._buffer.startswith(tag)

    def _consume(self, n: int) -> None:
        """Take n characters off the buffer into the pending call's text."""
        piece, self._buffer = self._buffer[:n], self._buffer[n:]
        if self._call is not None:
            self._call.raw += piece

    def _begin_call(self, opener: str) -> None:
        """A call starts with `opener` (already taken off the buffer); whitespace before it is not content."""
        self._call = _PendingCall(raw=self._held_space + opener)
        self._held_space = ""

    def _open(self, name: str, arguments: str = "") -> None:
        """Send the pending call's first delta (id and name) once its name is known, if it names a tool."""
        call = self._call
        if call is None or call.index is not None or name not in self.tools:
            return
        call.index, call.id, call.name, call.streamed = self._next_index, new_call_id(), name, arguments
        self._next_index += 1
        self._deltas.append(ToolCallDelta(call.index, call.id, name, arguments))

    def _stream(self, reader: CallReader) -> None:
        """Pass on what a reader learnt: open the call when its name is a tool, then new argument text."""
        call = self._call
        if call is None:
            return
        if call.index is None:
            if reader.name is not None and reader.name in self.tools:
                self._open(reader.name, reader.take_arguments())
            return
        more = reader.take_arguments()
        if more:
            call.streamed += more
            self._deltas.append(ToolCallDelta(call.index, None, None, more))

    def _read_call(self, reader: CallReader) -> bool:
        """Feed the buffer to the pending call's reader and stream what it learnt; True once it is over."""
        self._consume(reader.feed(self._buffer))
        self._stream(reader)
        return reader.done or reader.failed

    def _close_call(self, arguments: str | None) -> None:
        """End the pending call: list it if it streamed and its arguments are an object, else its text is content.

        Unconstrained output may have streamed deltas of a call that turns out invalid here; it is then not
        listed in `calls`, its index stays used, and its text also goes out as content.
        """
        call, self._call = self._call, None
        if call is None:
            return
        if call.index is None or arguments is None or not arguments.startswith(call.streamed):
            self._emit_text(call.raw)
            return
        rest = arguments[len(call.streamed) :]
        if rest:
            self._deltas.append(ToolCallDelta(call.index, None, None, rest))
        self._calls.append(ToolCall(call.index, call.id, call.name, arguments))
        self._after_call = True

    def _add_call(self, opener: str, name: str, arguments: str | None) -> None:
        """A call read whole (the pythonic format): listed if valid, else `opener` is content."""
        self._begin_call(opener)
        if arguments is not None:
            self._open(name)
        self._close_call(arguments)

    def _take(self) -> ParsedDelta:
        merged: list[ToolCallDelta] = []
        for delta in self._deltas:  # one delta per call per feed reads better downstream
            if merged and merged[-1].index == delta.index and delta.id is None:
                merged[-1] = replace(merged[-1], arguments=merged[-1].arguments + delta.arguments)
            else:
                merged.append(delta)
        content = "".join(self._content)
        self._content.clear()
        self._deltas.clear()
        return ParsedDelta(content, tuple(merged))
