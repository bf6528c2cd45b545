"""Tool-call parsers: the types they speak, the base class, and the registry by name.

A parser reads a choice's generated text as it streams and splits it into content for the user and the
function calls the model made. Each model family writes calls its own way, so there is one parser per format
(one module each) and `detect_tool_parser` picks one from the model's chat template.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is the JSON schema of its arguments object."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One complete call: `arguments` is the JSON text of an object, exactly the concatenation of its deltas."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """The new output of one call while it streams: id and name on its first delta only, then argument text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ParsedDelta:
    """What one piece of generated text turned out to be: text for the user and pieces of calls."""

    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


def new_call_id() -> str:
    """An OpenAI-style call id: "call_" and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


class ToolParser(abc.ABC):
    """Splits a choice's streamed text into content and calls of the given tools.

    `feed` takes the text in any split (a tag may arrive a character at a time) and `finish` flushes what was
    held back. A call whose name is not a tool, or whose arguments are not a JSON object, is never listed in
    `calls`: its text goes out as content.
    """

    name: ClassVar[str]

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        self.tools: dict[str, ToolSpec] = {tool.name: tool for tool in tools}
        self._calls: list[ToolCall] = []

    @abc.abstractmethod
    def feed(self, text: str) -> ParsedDelta:
        """Read the next piece of generated text."""

    @abc.abstractmethod
    def finish(self) -> ParsedDelta:
        """The output ended: flush held-back text as content and close a pending call."""

    @property
    def calls(self) -> list[ToolCall]:
        """The complete, valid calls so far, in order."""
        return list(self._calls)

    @classmethod
    @abc.abstractmethod
    def structural_tag(
        cls,
        tools: Sequence[ToolSpec],
        mode: str,
        forced: str | None = None,
        reasoning_prefix: dict[str, Any] | None = None,
        parallel: bool = True,
    ) -> dict[str, Any] | None:
        """An xgrammar structural tag that constrains output to this format, or None where it cannot.

        mode "auto": free text, but a call the model opens names a tool and follows its schema. mode
        "required": one or more calls and nothing else. `forced` names the one function to call exactly once.
        `reasoning_prefix` (from the reasoning parser) is put first. Unless `parallel`, at most one call.
        """

    @classmethod
    @abc.abstractmethod
    def matches_template(cls, chat_template: str) -> bool:
        """Whether a chat template asks the model for calls in this format."""


TOOL_PARSERS: dict[str, type[ToolParser]] = {}

_P = TypeVar("_P", bound=type[ToolParser])


def register_tool_parser(name: str) -> Callable[[_P], _P]:
    """Class decorator: name a parser and list it in TOOL_PARSERS."""

    def register(cls: _P) -> _P:
        cls.name = name
        TOOL_PARSERS[name] = cls
        return cls

    return register


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered under `name`; ValueError naming the choices for an unknown one."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; choose one of: {', '.join(sorted(TOOL_PARSERS))}") from None


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The one parser whose format the template uses; None when none does or several do."""
    if not chat_template:
        return None
    matches = [name for name, cls in TOOL_PARSERS.items() if cls.matches_template(chat_template)]
    return matches[0] if len(matches) == 1 else None
