"""Qwen3: reasoning only inside a `<think>` block the output opens, or the prompt opened (newer thinking
templates). With `enable_thinking: false` the template closes an empty block in the prompt and the output is
all content."""

from __future__ import annotations

from weir_server.parsers.reasoning_parser import register_reasoning_parser
from weir_server.parsers.think_reasoning_parser import ThinkReasoningParser


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ThinkReasoningParser):
    """Reasoning only when `<think>` opened it, in the output or at the end of the prompt."""

    reasoning_without_start = False
