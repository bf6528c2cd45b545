"""The `<think>...</think>` convention shared by DeepSeek-R1, Qwen3, QwQ and their kin.

Reasoning is the text inside the block at the start of the output, without the tags and without the newlines
that pad it; content is what follows, without the blank line after `</think>`. A template may open the
block in the prompt (`...<think>\\n`), or close an empty one to turn thinking off (`<think>\\n\\n</think>\\n\\n`).
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from weir_server.parsers.reasoning_parser import ReasoningDelta, ReasoningParser
from weir_server.parsers.streaming import partial_tag_len

THINK_START = "<think>"
THINK_END = "</think>"
AFTER_THINK = "\n\n"  # what the models write after </think>, and what the grammar has them write


class _State(enum.Enum):
    OPENING = enum.auto()  # the output has not yet shown whether it opens with <think>
    REASONING = enum.auto()
    CONTENT = enum.auto()


class ThinkReasoningParser(ReasoningParser):
    """Reasoning in a leading `<think>` block; subclasses say whether output is reasoning without the tag."""

    reasoning_without_start: ClassVar[bool]  # output with no <think> (in prompt or output) is still reasoning

    def __init__(self, prompt: str) -> None:
        super().__init__(prompt)
        tail = prompt.rstrip()
        self.prompt_opened = tail.endswith(THINK_START)
        self.prompt_closed = tail.endswith(THINK_END)
        self._state = _State.CONTENT if self.prompt_closed else _State.OPENING
        self._buffer = ""
        self._held_newlines = ""  # trailing newlines of the reasoning: dropped if </think> follows
        self._reasoning_started = False
        self._after_end = False  # right after </think>: its newlines are not content
        self._reasoning: list[str] = []
        self._content: list[str] = []

    def feed(self, text: str) -> ReasoningDelta:
        """Read the next piece of generated text."""
        self._buffer += text
        self._step(final=False)
        return self._take()

    def finish(self) -> ReasoningDelta:
        """The output ended: an unclosed block was all reasoning; flush what was held back."""
        self._step(final=True)
        self._reasoning.append(self._held_newlines)
        self._held_newlines = ""
        return self._take()

    def structural_prefix(self) -> dict[str, Any] | None:
        """The block (from "<think>", or from nothing when the prompt opened it) to "</think>" and "\\n\\n";
        optional when the model may answer without thinking; None when the prompt turned thinking off."""
        if self.prompt_closed:
            return None
        begin = "" if self.prompt_opened else THINK_START
        block: dict[str, Any] = {
            "type": "sequence",
            "elements": [
                {"type": "tag", "begin": begin, "content": {"type": "any_text"}, "end": THINK_END},
                {"type": "const_string", "value": AFTER_THINK},
            ],
        }
        if self.prompt_opened or self.reasoning_without_start:
            return block
        return {"type": "optional", "content": block}

    def _step(self, final: bool) -> None:
        while self._buffer:
            if self._state is _State.OPENING:
                rest = self._buffer.lstrip()
                if rest.startswith(THINK_START):
                    self._buffer = rest[len(THINK_START) :]
                    self._state = _State.REASONING
                    continue
                if not final and THINK_START.startswith(rest):
                    return
                thinking = self.prompt_opened or self.reasoning_without_start
                self._state = _State.REASONING if thinking else _State.CONTENT
            elif self._state is _State.REASONING:
                at = self._buffer.find(THINK_END)
                if at < 0:
                    keep = 0 if final else partial_tag_len(self._buffer, THINK_END)
                    self._add_reasoning(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                self._add_reasoning(self._buffer[:at])
                self._held_newlines = ""
                self._buffer = self._buffer[at + len(THINK_END) :]
                self._state = _State.CONTENT
                self._after_end = True
            else:
                if self._after_end:
                    self._buffer = self._buffer.lstrip("\n")
                    self._after_end = not self._buffer
                self._content.append(self._buffer)
                self._buffer = ""

    def _add_reasoning(self, text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            self._reasoning_started = bool(text)
        text = self._held_newlines + text
        body = text.rstrip("\n")
        self._held_newlines = text[len(body) :]
        self._reasoning.append(body)

    def _take(self) -> ReasoningDelta:
        delta = ReasoningDelta("".join(self._reasoning), "".join(self._content))
        self._reasoning.clear()
        self._content.clear()
        return delta
