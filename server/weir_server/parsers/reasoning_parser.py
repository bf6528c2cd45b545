"""Reasoning parsers: split a thinking model's streamed output into its reasoning and the answer (content).

One parser per model family's convention, registered by name; the servicer runs one per choice, and passes
its content on to the tool parser.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar


@dataclass(frozen=True)
class ReasoningDelta:
    """What one piece of generated text turned out to be: reasoning, content, or some of each."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser(abc.ABC):
    """Splits one choice's output into reasoning and content; `prompt` is the rendered prompt, which tells
    whether the template already opened (or closed) the reasoning block."""

    name: ClassVar[str]

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt

    @abc.abstractmethod
    def feed(self, text: str) -> ReasoningDelta:
        """Read the next piece of generated text (any split, even inside a tag)."""

    @abc.abstractmethod
    def finish(self) -> ReasoningDelta:
        """The output ended: flush what was held back."""

    @abc.abstractmethod
    def structural_prefix(self) -> dict[str, Any] | None:
        """The xgrammar format of the reasoning part of the output given this prompt; None when none is expected.

        A tool parser's structural tag puts it first.
        """


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {}

_R = TypeVar("_R", bound=type[ReasoningParser])


def register_reasoning_parser(name: str) -> Callable[[_R], _R]:
    """Class decorator: name a parser and list it in REASONING_PARSERS."""

    def register(cls: _R) -> _R:
        cls.name = name
        REASONING_PARSERS[name] = cls
        return cls

    return register


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered under `name`; ValueError naming the choices for an unknown one."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        choices = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {choices}") from None
