"""DeepSeek-R1 (and its distills, QwQ): the output is reasoning up to `</think>`, the template having opened
`<think>\\n` in the prompt; a `<think>` the model writes itself is dropped. Without `</think>` it was all
reasoning."""

from __future__ import annotations

from weir_server.parsers.reasoning_parser import register_reasoning_parser
from weir_server.parsers.think_reasoning_parser import ThinkReasoningParser


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    """Reasoning until `</think>`, whether or not a `<think>` opened it."""

    reasoning_without_start = True
