"""Pythonic calls (Llama 3.2 and Llama 4 with pythonic templates): the output is a Python list of calls.

    [get_weather(city="San Francisco, CA", days=3), search(query='(a, b)', filters={"tags": ["x", "y"]})]

Arguments are keyword arguments whose values are literals (strings, numbers, True/False/None, lists, tuples,
dicts, and JSON's true/false/null); they are read with `ast`, never evaluated, and sent as JSON. Each call
streams whole once its closing parenthesis arrives. Llama 4's `<|python_start|>`/`<|python_end|>` around the
list are dropped. Output that does not open with a list of calls is all content; text after it is content too.
"""

from __future__ import annotations

import ast
import enum
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from weir_server.parsers.streaming import StreamingToolParser
from weir_server.parsers.tool_parser import ToolSpec, register_tool_parser

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
_NAME = re.compile(r"[A-Za-z_][\w.]*")
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class _State(enum.Enum):
    START = enum.auto()  # does the output open with "["?
    LIST = enum.auto()
    CLOSING = enum.auto()  # after "]": an optional <|python_end|>
    TEXT = enum.auto()


class NotALiteral(ValueError):
    """A call argument that is not a literal JSON can carry."""


def literal(node: ast.expr) -> Any:
    """The JSON-able value of a literal expression; NotALiteral for anything else."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, bool | int | float | str)):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise NotALiteral("not a finite number")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NotALiteral("a sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List | ast.Tuple):
        return [literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        keys = [literal(key) if key is not None else None for key in node.keys]
        if not all(isinstance(key, str) for key in keys):
            raise NotALiteral("dict keys must be strings")
        return dict(zip(keys, (literal(value) for value in node.values), strict=True))
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise NotALiteral(type(node).__name__)


def parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one `name(key=literal, ...)` call, or None if it is not one."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = ast.unparse(node.func)
        if _NAME.fullmatch(name) is None or any(kw.arg is None for kw in node.keywords):
            return None
        arguments = {kw.arg: literal(kw.value) for kw in node.keywords if kw.arg is not None}
    except (SyntaxError, NotALiteral, RecursionError, ValueError):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


@register_tool_parser("pythonic")
class PythonicToolParser(StreamingToolParser):
    """Calls as a Python list `[f(a=1), g(b="x")]` that makes up the output."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        super().__init__(tools)
        self._state = _State.START
        self._scanned = 0  # how far into the buffer the list has been scanned
        self._depth = 1  # brackets open, the list's own included
        self._quote = ""  # the open string's quote ("'", '"', "'''" or '\"\"\"'), if any
        self._element = 0  # where the element being read starts in the buffer
        self._calls_before_list = 0

    def _step(self, final: bool) -> None:
        while self._buffer or final:
            if self._state is _State.START:
                rest = self._buffer.lstrip()
                if rest.startswith(PYTHON_START):
                    rest = rest[len(PYTHON_START) :].lstrip()
                if not final and (not rest or PYTHON_START.startswith(rest)):
                    return
                if not rest.startswith("["):
                    self._state = _State.TEXT
                    continue
                self._scanned = self._element = len(self._buffer) - len(rest) + 1
                self._calls_before_list = len(self._calls)
                self._state = _State.LIST
            elif self._state is _State.LIST:
                if not self._scan_list(final):
                    return
            elif self._state is _State.CLOSING:
                rest = self._buffer.lstrip()
                if not final and PYTHON_END.startswith(rest) and rest != PYTHON_END:
                    return
                if rest.startswith(PYTHON_END):
                    self._buffer = rest[len(PYTHON_END) :]
                self._state = _State.TEXT
            else:
                self._emit_text(self._buffer)
                self._buffer = ""
                return

    def _scan_list(self, final: bool) -> bool:
        """Scan the list from where the last scan stopped; False to wait for more text."""
        text, i = self._buffer, self._scanned
        while i < len(text):
            ch = text[i]
            if self._quote:
                if ch == "\\":
                    i += 2
                    continue
                if not final and self._quote.startswith(text[i:]) and text[i:] != self._quote:
                    break  # a closing triple quote may still be arriving
                if text.startswith(self._quote, i):
                    i += len(self._quote)
                    self._quote = ""
                    continue
            elif ch in "'\"":
                if i + 3 > len(text) and not final:
                    break  # a triple quote may still be arriving
                self._quote = ch * 3 if text.startswith(ch * 3, i) else ch
                i += len(self._quote)
                continue
            elif ch in "([{":
                self._depth += 1
            elif ch in ")]}":
                self._depth -= 1
                if self._depth == 1 and ch == ")":
                    self._end_element(i + 1)
                    text, i = self._buffer, 0
                    continue
                if self._depth == 0:
                    return self._end_list(i + 1, ch)
            elif self._depth == 1 and not self._element_may_start_call(text, i):
                return self._not_a_call()
            i += 1
        self._scanned = i
        if final:
            return self._not_a_call()
        return False

    def _element_may_start_call(self, text: str, i: int) -> bool:
        """At list level only separators and the start of `name(` may appear."""
        head = text[self._element : i + 1].lstrip(" \t\r\n,")
        return not head or _NAME.fullmatch(head) is not None

    def _end_element(self, end: int) -> None:
        element = self._buffer[:end]
        call_text = element[self._element :].lstrip(" \t\r\n,")
        parsed = parse_call(call_text)
        self._buffer = self._buffer[end:]
        self._element = self._scanned = 0
        name, arguments = parsed if parsed is not None else ("", None)
        self._add_call(element, name, arguments if name in self.tools else None)

    def _end_list(self, end: int, closer: str) -> bool:
        if closer != "]" or self._buffer[self._element : end - 1].strip(" \t\r\n,"):
            return self._not_a_call()
        if len(self._calls) == self._calls_before_list:  # no call counted: the brackets are content
            return self._not_a_call()
        self._buffer = self._buffer[end:]
        self._state = _State.CLOSING
        return True

    def _not_a_call(self) -> bool:
        """What is left of the list is not a call: it and the rest are content."""
        self._state = _State.TEXT
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
        """None: xgrammar has no format for Python keyword arguments, and a hand-written grammar could check
        names and literal syntax but not the schemas, so calls are left unconstrained (and checked here)."""
        return None

    @classmethod
    def matches_template(cls, chat_template: str) -> bool:
        """Templates that ask for `[func_name1(params_name1=params_value1, ...)]`."""
        return re.search(r"\[\s*func_name1\s*\(\s*params?_name1\s*=", chat_template) is not None
