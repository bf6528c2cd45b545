"""A conversation as the server receives it, and the checks a conversation with tool calls must pass."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from weir_server.errors import InvalidRequestError

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCallRef:
    """A call an assistant turn made earlier in the conversation: its id, function and arguments (JSON text)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation. `tool_calls` on assistant turns; `tool_call_id` on tool turns."""

    role: str
    content: str
    tool_calls: tuple[ToolCallRef, ...] = ()
    tool_call_id: str = ""
    name: str = ""


def check_conversation(messages: Sequence[ChatMessage]) -> None:
    """Raise InvalidRequestError naming the first bad field: unknown roles, calls whose arguments are not a JSON
    object, tool results that answer no earlier call."""
    if not messages:
        raise InvalidRequestError("messages", "must hold at least one message")
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"{field}.role", f"unknown role {message.role!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequestError(f"{field}.tool_calls", "only assistant turns make tool calls")
        for j, call in enumerate(message.tool_calls):
            if not call.name:
                raise InvalidRequestError(f"{field}.tool_calls[{j}].name", "must name the function called")
            _check_arguments(call.arguments, f"{field}.tool_calls[{j}].arguments")
            if call.id:
                call_ids.add(call.id)
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequestError(f"{field}.tool_call_id", "a tool turn must name the call it answers")
            if message.tool_call_id not in call_ids:
                raise InvalidRequestError(
                    f"{field}.tool_call_id", f"{message.tool_call_id!r} answers no tool call made earlier"
                )
        elif message.tool_call_id:
            raise InvalidRequestError(f"{field}.tool_call_id", "only tool turns answer a call")


def _check_arguments(text: str, field: str) -> None:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise InvalidRequestError(field, f"is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRequestError(field, "must be the JSON text of an object")


def parsed_arguments(call: ToolCallRef) -> dict[str, object]:
    """A checked call's arguments as a dict (chat templates iterate over them)."""
    value = json.loads(call.arguments) if call.arguments.strip() else {}
    assert isinstance(value, dict)
    return value
