"""Shared checks for the parser tests: run a parser over every split of an output and compare the result."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from weir_server.parsers import ReasoningParser, ToolCall, ToolCallDelta, ToolParser, ToolSpec

CALL_ID = re.compile(r"call_[0-9a-f]{24}")

WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
)
TIME = ToolSpec(
    "get_time",
    "Local time in a time zone",
    {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
)
SEARCH = ToolSpec(
    "search_docs",
    "Search the documentation",
    {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "filters": {"type": "object"},
            "exact": {"type": "boolean"},
            "limit": {"type": ["integer", "null"]},
        },
        "required": ["query"],
    },
)
NO_ARGS = ToolSpec("list_cities", "All known cities", {"type": "object", "properties": {}})
TOOLS = (WEATHER, TIME, SEARCH, NO_ARGS)


def splits(text: str) -> Iterator[list[str]]:
    """All at once, one character at a time, and in two pieces at every boundary."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


@dataclass
class ToolRun:
    """What a tool parser produced over one split of an output."""

    content: str = ""
    deltas: dict[int, list[ToolCallDelta]] = field(default_factory=dict)
    calls: list[ToolCall] = field(default_factory=list)

    def arguments(self, index: int) -> str:
        return "".join(delta.arguments for delta in self.deltas[index])


def run_tool_parser(parser_cls: type[ToolParser], pieces: Sequence[str], tools: Sequence[ToolSpec] = TOOLS) -> ToolRun:
    parser = parser_cls(tools)
    run = ToolRun()
    for delta in [*(parser.feed(piece) for piece in pieces), parser.finish()]:
        run.content += delta.content
        for call_delta in delta.tool_calls:
            run.deltas.setdefault(call_delta.index, []).append(call_delta)
    run.calls = parser.calls
    return run


def check_tool_output(
    parser_cls: type[ToolParser],
    output: str,
    content: str,
    calls: Sequence[tuple[str, dict[str, Any]]],
    tools: Sequence[ToolSpec] = TOOLS,
) -> None:
    """Over every split: the content, the calls, and deltas that add up to each call exactly."""
    for pieces in splits(output):
        run = run_tool_parser(parser_cls, pieces, tools)
        where = f"split {[len(piece) for piece in pieces][:3]}"
        assert run.content == content, where
        assert [(call.name, json.loads(call.arguments)) for call in run.calls] == list(calls), where
        assert [call.index for call in run.calls] == list(range(len(calls))), where
        assert sorted(run.deltas) == [call.index for call in run.calls], where
        for call in run.calls:
            first, *rest = run.deltas[call.index]
            assert (first.id, first.name) == (call.id, call.name), where
            assert all(delta.id is None and delta.name is None for delta in rest), where
            assert run.arguments(call.index) == call.arguments, where
            assert CALL_ID.fullmatch(call.id), where
        assert len({call.id for call in run.calls}) == len(run.calls)


def run_reasoning_parser(parser_cls: type[ReasoningParser], prompt: str, pieces: Sequence[str]) -> tuple[str, str]:
    parser = parser_cls(prompt)
    reasoning = content = ""
    for delta in [*(parser.feed(piece) for piece in pieces), parser.finish()]:
        reasoning += delta.reasoning
        content += delta.content
    return reasoning, content


def check_reasoning_output(
    parser_cls: type[ReasoningParser], prompt: str, output: str, reasoning: str, content: str
) -> None:
    """Over every split: the same reasoning and content."""
    for pieces in splits(output):
        assert run_reasoning_parser(parser_cls, prompt, pieces) == (reasoning, content), [len(p) for p in pieces][:3]
