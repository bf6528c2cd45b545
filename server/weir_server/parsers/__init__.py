"""Tool-call and reasoning parsers: pure text in, content, reasoning and calls out (no torch, no grpc).

Importing the package registers every parser in TOOL_PARSERS and REASONING_PARSERS.
"""

from weir_server.parsers import (
    deepseek_r1_reasoning_parser,
    hermes_tool_parser,
    json_tool_parser,
    llama_tool_parser,
    mistral_tool_parser,
    pythonic_tool_parser,
    qwen3_reasoning_parser,
)
from weir_server.parsers.reasoning_parser import (
    REASONING_PARSERS,
    ReasoningDelta,
    ReasoningParser,
    get_reasoning_parser,
)
from weir_server.parsers.tool_parser import (
    TOOL_PARSERS,
    ParsedDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    ToolSpec,
    detect_tool_parser,
    get_tool_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ParsedDelta",
    "ReasoningDelta",
    "ReasoningParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "ToolSpec",
    "deepseek_r1_reasoning_parser",
    "detect_tool_parser",
    "get_reasoning_parser",
    "get_tool_parser",
    "hermes_tool_parser",
    "json_tool_parser",
    "llama_tool_parser",
    "mistral_tool_parser",
    "pythonic_tool_parser",
    "qwen3_reasoning_parser",
]
