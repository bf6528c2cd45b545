"""Mistral calls after the `[TOOL_CALLS]` token, in either of Mistral's two forms:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

The first is the JSON list of tokenizers up to v7 (Mistral 7B v0.3, Nemo, Small 2409); the second that of
v11 and later (Small 3.1+, Magistral, Devstral), where `[CALL_ID]id` may come before `[ARGS]`. Text before
`[TOOL_CALLS]` is content. The markers are special tokens: the detokenizer must keep them for the parser to see.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from weir_server.parsers import structural
from weir_server.parsers.call_list import CallListToolParser
from weir_server.parsers.json_scan import ArgumentsReader
from weir_server.parsers.tool_parser import ToolSpec, register_tool_parser

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_MAX_NAME = 256  # a "name" longer than this without [ARGS] is text, not a call


class _State(enum.Enum):
    TEXT = enum.auto()
    OPENED = enum.auto()  # after [TOOL_CALLS]: a list or a name?
    LIST = enum.auto()  # inside the JSON list
    NAME = enum.auto()  # v11: the name up to [ARGS]
    ARGUMENTS = enum.auto()  # v11: the arguments object


@register_tool_parser("mistral")
class MistralToolParser(CallListToolParser):
    """Calls after `[TOOL_CALLS]`: a JSON list of call objects, or v11's `name[ARGS]{...}`."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        super().__init__(tools)
        self._state = _State.TEXT
        self._reader = ArgumentsReader("")

    def _step(self, final: bool) -> None:
        while self._buffer or final:
            if self._state is _State.TEXT:
                if not self._emit_text_until(TOOL_CALLS, final):
                    return
                self._state = _State.OPENED
            elif self._state is _State.OPENED:
                rest = self._buffer[len(TOOL_CALLS) :].lstrip()
                if not rest and not final:
                    return
                if rest.startswith("["):
                    self._start_list(len(self._buffer) - len(rest) + 1)
                    self._state = _State.LIST
                else:
                    self._state = _State.NAME
            elif self._state is _State.LIST:
                if not self._step_list(final):
                    return
                self._state = _State.TEXT
            elif self._state is _State.NAME:
                if not self._step_name(final):
                    return
            else:
                if not self._read_call(self._reader):
                    return
                self._close_call(self._reader.arguments())
                self._state = _State.TEXT

    def _step_name(self, final: bool) -> bool:
        """Read `[TOOL_CALLS]name[ARGS]` (or with `[CALL_ID]id` before `[ARGS]`); False to wait for more."""
        args_at = self._buffer.find(ARGS, len(TOOL_CALLS))
        marker_at = self._buffer.find("[", len(TOOL_CALLS))
        head = self._buffer[marker_at:] if marker_at >= 0 else ""
        if args_at < 0 and not final:
            could_be_marker = ARGS.startswith(head) or head.startswith(CALL_ID) or CALL_ID.startswith(head)
            if len(self._buffer) <= _MAX_NAME and (marker_at < 0 or could_be_marker):
                return False
        if args_at < 0 or not (marker_at == args_at or head.startswith(CALL_ID)):
            self._emit_text(self._buffer[: len(TOOL_CALLS)])  # not a call: the marker is text, read on
            self._buffer = self._buffer[len(TOOL_CALLS) :]
            self._state = _State.TEXT
            return True
        name = self._buffer[len(TOOL_CALLS) : marker_at].strip()
        self._begin_call("")
        self._consume(args_at + len(ARGS))
        self._reader = ArgumentsReader(name)
        self._stream(self._reader)
        self._state = _State.ARGUMENTS
        return True

    @classmethod
    def structural_tag(
        cls,
        tools: Sequence[ToolSpec],
        mode: str,
        forced: str | None = None,
        reasoning_prefix: dict[str, Any] | None = None,
        parallel: bool = True,
    ) -> dict[str, Any] | None:
        """Either form, so the model writes the one it was trained on; the string trigger "[TOOL_CALLS]".

        A string trigger matches the special token too (xgrammar matches a token by its text, and Mistral's
        `[TOOL_CALLS]` decodes to exactly that text); token-level formats would fail to compile for a
        vocabulary without the token, and `structural_tag` is not told the vocabulary.
        """
        chosen = structural.call_tools(tools, mode, forced)
        if chosen is None:
            return None
        objects = [structural.call_tag(tool, '{"name": ', ', "arguments": ', "}") for tool in chosen]
        items = objects[0] if forced is not None else structural.separated(objects, ", ", parallel)
        lists = [
            {"type": "tag", "begin": TOOL_CALLS + space + "[", "content": items, "end": "]"} for space in ("", " ")
        ]
        named = [
            {
                "type": "tag",
                "begin": TOOL_CALLS + tool.name + ARGS,
                "content": structural.arguments_schema(tool),
                "end": "",
            }
            for tool in chosen
        ]
        if forced is not None:
            body = structural.any_of([*lists, *named])
        elif mode == "required":
            calls = structural.any_of(named)
            body = structural.any_of([*lists, {"type": "plus", "content": calls} if parallel else calls])
        else:
            body = structural.triggered([TOOL_CALLS], [*lists, *named], parallel)
        return structural.structural_tag(body, reasoning_prefix)

    @classmethod
    def matches_template(cls, chat_template: str) -> bool:
        """Mistral templates, which render calls after [TOOL_CALLS]."""
        return TOOL_CALLS in chat_template
