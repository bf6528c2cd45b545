"""One choice's output split three ways as it streams: reasoning, answer text and tool calls."""

from __future__ import annotations

from dataclasses import dataclass

from weir_server.parsers.reasoning_parser import ReasoningDelta, ReasoningParser
from weir_server.parsers.tool_parser import ParsedDelta, ToolCall, ToolCallDelta, ToolParser


@dataclass(frozen=True)
class ChoiceDelta:
    """What a piece of output added: answer text, reasoning text, and pieces of tool calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


class ChoiceParser:
    """Reasoning is split off first (calls inside it are not calls); the rest goes through the tool parser."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str) -> ChoiceDelta:
        """The next piece of generated text."""
        if not text:
            return ChoiceDelta()
        split = self.reasoning.feed(text) if self.reasoning is not None else ReasoningDelta(content=text)
        return self._tools(split, final=False)

    def finish(self) -> ChoiceDelta:
        """The output ended: whatever was held back, and a call left open."""
        split = self.reasoning.finish() if self.reasoning is not None else ReasoningDelta()
        return self._tools(split, final=True)

    def _tools(self, split: ReasoningDelta, final: bool) -> ChoiceDelta:
        if self.tools is None:
            return ChoiceDelta(split.content, split.reasoning)
        parsed = self.tools.feed(split.content) if split.content else ParsedDelta()
        if final:
            rest = self.tools.finish()
            parsed = ParsedDelta(parsed.content + rest.content, parsed.tool_calls + rest.tool_calls)
        return ChoiceDelta(parsed.content, split.reasoning, parsed.tool_calls)

    @property
    def calls(self) -> list[ToolCall]:
        """The choice's complete calls so far."""
        return self.tools.calls if self.tools is not None else []
