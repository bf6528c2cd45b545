"""Building blocks of xgrammar structural tags (plain JSON-able dicts) shared by the tool parsers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from weir_server.parsers.tool_parser import ToolSpec

Format = dict[str, Any]

MODES = ("auto", "required")


def call_tools(tools: Sequence[ToolSpec], mode: str, forced: str | None) -> list[ToolSpec] | None:
    """The tools a tag offers: all of them, just the forced one, or None when auto mode has none to offer.

    ValueError for an unknown mode, a forced name that is not a tool, or required mode without tools.
    """
    if mode not in MODES:
        raise ValueError(f"unknown tool choice mode {mode!r}; choose one of: {', '.join(MODES)}")
    if forced is not None:
        chosen = [tool for tool in tools if tool.name == forced]
        if not chosen:
            raise ValueError(f"forced tool {forced!r} is not one of the tools")
        return chosen[:1]
    if not tools:
        if mode == "required":
            raise ValueError("tool choice 'required' needs at least one tool")
        return None
    return list(tools)


# Runs of whitespace inside arguments are capped: free whitespace lets small models ramble spaces and newlines
# until max_tokens (the same reason plain JSON-schema constraints are compiled compact).
MAX_WHITESPACE = 1


def arguments_schema(tool: ToolSpec) -> Format:
    """The tool's arguments as a JSON-schema format (an empty schema still means an object)."""
    return {
        "type": "json_schema",
        "json_schema": tool.parameters or {"type": "object"},
        "max_whitespace_cnt": MAX_WHITESPACE,
    }


def call_tag(tool: ToolSpec, before_name: str, after_name: str, end: str) -> Format:
    """`before_name` + the JSON-quoted name + `after_name`, the arguments object, then `end`."""
    begin = before_name + json.dumps(tool.name, ensure_ascii=False) + after_name
    return {"type": "tag", "begin": begin, "content": arguments_schema(tool), "end": end}


def const(value: str) -> Format:
    """Exactly this text."""
    return {"type": "const_string", "value": value}


def any_of(elements: Sequence[Format]) -> Format:
    """One of the formats (the format itself when there is one)."""
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": list(elements)}


def sequence(*elements: Format) -> Format:
    """The formats one after another."""
    return {"type": "sequence", "elements": list(elements)}


def optional(content: Format) -> Format:
    """The format or nothing."""
    return {"type": "optional", "content": content}


def separated(tags: Sequence[Format], separator: str, parallel: bool = True) -> Format:
    """One or more of the tags with `separator` between them and nothing else; exactly one unless `parallel`."""
    if not parallel:
        return any_of(tags)
    return {"type": "tags_with_separator", "tags": list(tags), "separator": separator, "at_least_one": True}


def triggered(triggers: Sequence[str], tags: Sequence[Format], parallel: bool = True) -> Format:
    """Free text in which each trigger opens one of the tags; after the first tag the output ends unless
    `parallel`."""
    return {"type": "triggered_tags", "triggers": list(triggers), "tags": list(tags), "stop_after_first": not parallel}


def free_text_not_starting_with(first_chars: str, excludes: Sequence[str] = ()) -> Format:
    """Text that is empty or starts with neither whitespace nor one of `first_chars`.

    Formats whose calls are the whole output use it for auto mode: text that a parser would read as a call
    cannot slip out of the grammar's call branch.
    """
    rest: Format = {"type": "any_text"}
    if excludes:
        rest["excludes"] = list(excludes)
    first = "[^\\s" + "".join("\\" + ch if ch in "\\[]^-{}" else ch for ch in first_chars) + "]"
    return optional(sequence({"type": "regex", "pattern": first}, rest))


def answer_format(kind: str, value: str | Sequence[str]) -> Format:
    """An output constraint (json_schema text, json_object, regex, choice, grammar) as a format, so that a
    request with tools in auto mode can answer either with calls or with text of that shape."""
    if kind == "json_schema":
        assert isinstance(value, str)
        schema = json.loads(value)  # the caller checked it parses
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE}
    if kind == "json_object":
        return {"type": "json_schema", "json_schema": {"type": "object"}, "max_whitespace_cnt": MAX_WHITESPACE}
    if kind == "regex":
        return {"type": "regex", "pattern": value}
    if kind == "grammar":
        return {"type": "grammar", "grammar": value}
    if kind == "choice":
        return any_of([const(choice) for choice in value])
    raise ValueError(f"unknown constraint kind {kind!r}")


def structural_tag(body: Format, reasoning_prefix: Format | None) -> dict[str, Any]:
    """The top-level structural tag: the reasoning prefix, if any, then the body."""
    fmt = body if reasoning_prefix is None else sequence(reasoning_prefix, body)
    return {"type": "structural_tag", "format": fmt}
