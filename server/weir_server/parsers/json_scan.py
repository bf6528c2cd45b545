"""Incremental readers of the JSON a model writes for a call, fed text as it arrives.

They track structure only (strings, escapes, brackets) so they know where a value ends and can hand out the
raw text of the arguments while it is still being written; `json.loads` judges the finished text.
"""

from __future__ import annotations

import enum
import json

_SCALAR_END = frozenset(",}] \t\r\n")


class JsonValueScanner:
    """Finds where one JSON value ends, starting at its first character."""

    def __init__(self) -> None:
        self.first = ""  # the value's first character: '"', '{', '[' or that of a number/literal
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> int:
        """Consume text up to the end of the value; return how many characters belong to it."""
        for i, ch in enumerate(text):
            if not self.first:
                self.first = ch
                if ch == '"':
                    self._in_string = True
                elif ch in "{[":
                    self._depth = 1
                continue
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.done = True
                        return i + 1
            elif self._depth == 0:  # a number or literal ends before its delimiter
                if ch in _SCALAR_END:
                    self.done = True
                    return i
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


def arguments_text(raw: str | None) -> str | None:
    """The arguments JSON text for a call from the raw value the model wrote, or None if it is not an object.

    An object is kept as written (so it equals its streamed pieces); a string holding an object, which some
    models write, is unwrapped; a missing or null value means no arguments.
    """
    if raw is None or raw == "null":
        return "{}"
    try:
        value = json.loads(raw)
        if isinstance(value, str):
            raw, value = value, json.loads(value)
    except json.JSONDecodeError:
        return None
    return raw if isinstance(value, dict) else None


class _At(enum.Enum):
    START = enum.auto()  # before the opening brace
    FIRST_KEY = enum.auto()  # a key or the closing brace of an empty object
    KEY = enum.auto()
    COLON = enum.auto()
    VALUE = enum.auto()
    SCAN = enum.auto()  # inside a key or value
    NEXT = enum.auto()  # a comma or the closing brace


_ARGUMENT_KEYS = ("arguments", "parameters")


class CallObjectReader:
    """Reads one `{"name": ..., "arguments": {...}}` object ("parameters" also names the arguments).

    `name` is set once its string is complete; `take_arguments()` hands out the argument text written since
    the last take, while an object value is still open. Other keys are skipped.
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self.done = False
        self.failed = False
        self._at = _At.START
        self._scanner = JsonValueScanner()
        self._scanning_key = False
        self._key = ""  # decoded key of the value being read
        self._token = ""  # raw key text, or raw name text
        self._arguments: str | None = None  # raw text of the arguments value, None until it starts
        self._reading_arguments = False
        self._taken = 0

    def feed(self, text: str) -> int:
        """Consume text up to the object's closing brace; return how many characters were used."""
        i = 0
        while i < len(text) and not (self.done or self.failed):
            if self._at is _At.SCAN:
                used = self._scanner.feed(text[i:])
                self._collect(text[i : i + used])
                i += used
                if self._scanner.done:
                    self._end_token()
                continue
            ch = text[i]
            if ch.isspace():
                i += 1
                continue
            if self._at is _At.START and ch == "{":
                self._at = _At.FIRST_KEY
            elif self._at in (_At.FIRST_KEY, _At.KEY) and ch == '"':
                self._start_token(key=True)
                continue  # the scanner reads the quote
            elif self._at in (_At.FIRST_KEY, _At.NEXT) and ch == "}":
                self.done = True
            elif self._at is _At.COLON and ch == ":":
                self._at = _At.VALUE
            elif self._at is _At.VALUE and ch not in ",:]}":
                self._start_token(key=False)
                continue
            elif self._at is _At.NEXT and ch == ",":
                self._at = _At.KEY
            else:
                self.failed = True
                break
            i += 1
        return i

    def take_arguments(self) -> str:
        """Argument text written since the last take; only an object value streams (a string one waits)."""
        if self._arguments is None or not self._arguments.startswith("{"):
            return ""
        new = self._arguments[self._taken :]
        self._taken = len(self._arguments)
        return new

    def arguments(self) -> str | None:
        """The final arguments JSON text once done, or None if they are not a JSON object."""
        return arguments_text(self._arguments) if self.done else None

    def _start_token(self, *, key: bool) -> None:
        self._at = _At.SCAN
        self._scanner = JsonValueScanner()
        self._scanning_key = key
        self._token = ""
        # The first "arguments" (or "parameters") value is the call's; a repeated key is skipped.
        self._reading_arguments = not key and self._key in _ARGUMENT_KEYS and self._arguments is None
        if self._reading_arguments:
            self._arguments = ""

    def _collect(self, piece: str) -> None:
        if self._reading_arguments:
            self._arguments = (self._arguments or "") + piece
        elif self._scanning_key or self._key == "name":
            self._token += piece

    def _end_token(self) -> None:
        try:
            decoded = json.loads(self._token) if self._token else None
        except json.JSONDecodeError:
            self.failed = True
            return
        if self._scanning_key:
            self._key = decoded if isinstance(decoded, str) else ""
            self._at = _At.COLON
            return
        if self._key == "name" and self.name is None and isinstance(decoded, str):
            self.name = decoded
        self._reading_arguments = False
        self._at = _At.NEXT


class ArgumentsReader:
    """Reads a bare arguments object for a call whose name came before it (Mistral's `name[ARGS]{...}`).

    Same surface as CallObjectReader, so a parser streams either the same way.
    """

    def __init__(self, name: str) -> None:
        self.name: str | None = name
        self.done = False
        self.failed = False
        self._scanner = JsonValueScanner()
        self._text = ""
        self._taken = 0

    def feed(self, text: str) -> int:
        """Consume text up to the object's closing brace (leading whitespace skipped); return characters used."""
        i = 0
        if not self._scanner.first:
            while i < len(text) and text[i].isspace():
                i += 1
            if i < len(text) and text[i] != "{":
                self.failed = True
                return i
        used = self._scanner.feed(text[i:])
        self._text += text[i : i + used]
        self.done = self._scanner.done
        return i + used

    def take_arguments(self) -> str:
        """Argument text written since the last take."""
        new = self._text[self._taken :]
        self._taken = len(self._text)
        return new

    def arguments(self) -> str | None:
        """The arguments JSON text once done, or None if it is not a JSON object."""
        return arguments_text(self._text) if self.done else None
