"""Tools for a chat template that knows nothing of them (SmolLM2's, Llama 2's...): the tool definitions go into the
system turn with instructions to answer in the Hermes format (`<tool_call>{"name": ..., "arguments": ...}
</tool_call>`, which the hermes parser reads back), earlier calls become that text in their assistant turns, and
tool results become user turns wrapped in `<tool_response>`. Only plain user/assistant/system turns reach the
template, so any template that renders a chat renders this."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from weir_server.chat.messages import ChatMessage, parsed_arguments
from weir_server.parsers.tool_parser import ToolSpec

TOOLS_PREAMBLE = (
    "You may call one or more functions to help with the user's request. The functions are described in JSON "
    "within <tools></tools> tags:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments within <tool_call></tool_call> "
    'tags, one per call:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n'
    "Results come back within <tool_response></tool_response> tags."
)


def tools_system_text(tools: Sequence[ToolSpec]) -> str:
    """The system text that describes the tools and how to call them."""
    lines = "\n".join(
        json.dumps({"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": t.parameters}}, ensure_ascii=False)
        for t in tools
    )  # fmt: skip
    return TOOLS_PREAMBLE.format(tools=lines)


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """One call as the model is asked to write it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def render_generically(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> list[dict[str, str]]:
    """The conversation as plain system/user/assistant turns carrying the tools, calls and results as text."""
    turns: list[dict[str, str]] = []
    if tools:
        preamble = tools_system_text(tools)
        if messages and messages[0].role == "system":
            turns.append({"role": "system", "content": f"{messages[0].content}\n\n{preamble}"})
            messages = messages[1:]
        else:
            turns.append({"role": "system", "content": preamble})
    for message in messages:
        if message.role == "tool":
            result = f"<tool_response>\n{message.content}\n</tool_response>"
            if turns and turns[-1]["role"] == "user" and turns[-1]["content"].endswith("</tool_response>"):
                turns[-1]["content"] += "\n" + result  # results of parallel calls share one turn
            else:
                turns.append({"role": "user", "content": result})
        elif message.tool_calls:
            calls = "\n".join(call_text(c.name, parsed_arguments(c)) for c in message.tool_calls)
            content = f"{message.content}\n{calls}" if message.content else calls
            turns.append({"role": "assistant", "content": content})
        else:
            turns.append({"role": message.role, "content": message.content})
    return turns
