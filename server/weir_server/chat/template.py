"""Rendering a conversation with the model's chat template (or the server's override), with tools and template
variables; a template that knows nothing of tools gets them rendered generically (generic_tools.py)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from weir_server.chat.encoding import Marker
from weir_server.chat.generic_tools import render_generically
from weir_server.chat.messages import ChatMessage, ToolCallRef, check_conversation, parsed_arguments
from weir_server.errors import InvalidRequestError
from weir_server.parsers.tool_parser import ToolSpec

# apply_chat_template's own parameters: a template variable of one of these names would change how it renders
# (chat_template=... would swap the template itself), so chat_template_kwargs may not set them.
RESERVED_KWARGS = frozenset(
    {
        "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens",
    }
)  # fmt: skip
MAX_KWARGS_BYTES = 64 * 1024


def template_kwargs(text: str, max_bytes: int = MAX_KWARGS_BYTES) -> dict[str, Any]:
    """`chat_template_kwargs` (JSON text of an object) as template variables; raises InvalidRequestError."""
    if not text:
        return {}
    size = len(text.encode())
    if size > max_bytes:
        raise InvalidRequestError("chat_template_kwargs", f"is {size} bytes; the limit is {max_bytes} bytes")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidRequestError("chat_template_kwargs", f"is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRequestError("chat_template_kwargs", "must be the JSON text of an object")
    reserved = sorted(RESERVED_KWARGS.intersection(value))
    if reserved:
        raise InvalidRequestError("chat_template_kwargs", f"may not set {', '.join(reserved)}")
    return value


class ChatTemplate:
    """One model's chat template. Rendering runs in transformers' sandboxed Jinja environment: no code runs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, override: str | None = None) -> None:
        self.hf = tokenizer
        self.override = override
        source = override if override is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(source, Mapping):  # named templates: the tool-use one knows tools
            source = source.get("tool_use") or source.get("default") or next(iter(source.values()), None)
        self.source: str | None = source or None

    @property
    def available(self) -> bool:
        return self.source is not None

    @functools.cached_property
    def knows_tools(self) -> bool:
        """Whether the template reads the `tools` variable (if not, Weir renders tools itself)."""
        if self.source is None:
            return False
        try:
            parsed = jinja2.sandbox.ImmutableSandboxedEnvironment().parse(self.source)
        except TemplateError:
            return False
        return "tools" in jinja2.meta.find_undeclared_variables(parsed)

    def render(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec] = (),
        add_generation_prompt: bool = True,
        kwargs: Mapping[str, Any] | None = None,
        mark: Marker | None = None,
    ) -> str:
        """The prompt text of a conversation; raises InvalidRequestError for a conversation the template refuses.
        `mark` is applied to every string the request gave (see chat/encoding.py) once the conversation is checked."""
        check_conversation(messages)
        if self.source is None:
            raise InvalidRequestError("messages", "this model has no chat template; send a prompt instead")
        if mark is not None:
            messages = [_marked_message(m, mark) for m in messages]
            tools = [ToolSpec(t.name, mark(t.description), mark(t.parameters)) for t in tools]
            kwargs = mark(dict(kwargs or {}))
        has_tool_turns = any(m.tool_calls or m.role == "tool" for m in messages)
        if (tools or has_tool_turns) and not self.knows_tools:
            conversation = render_generically(messages, tools)
            tools = ()
        else:
            conversation = [_hf_message(m) for m in messages]
        extra: dict[str, Any] = dict(kwargs or {})
        if tools:
            extra["tools"] = [_hf_tool(t) for t in tools]
        try:
            rendered = self.hf.apply_chat_template(
                conversation,
                chat_template=self.source,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
        except TemplateError as e:
            raise InvalidRequestError("messages", f"the chat template rejected the conversation: {e}") from e
        except (TypeError, OverflowError, ValueError) as e:
            # How the sandbox refuses file access ({% include %} has no loader) and huge ranges.
            raise InvalidRequestError("messages", f"the chat template failed (it runs sandboxed): {e}") from e
        if not isinstance(rendered, str):
            raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
        return rendered


def _marked_message(message: ChatMessage, mark: Marker) -> ChatMessage:
    calls = tuple(ToolCallRef(mark(c.id), mark(c.name), mark(c.arguments)) for c in message.tool_calls)
    return ChatMessage(message.role, mark(message.content), calls, mark(message.tool_call_id), mark(message.name))


def _hf_message(message: ChatMessage) -> dict[str, Any]:
    """A turn in the shape Hugging Face chat templates read (arguments as a dict, as their docs ask)."""
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": parsed_arguments(c)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    if message.name:
        turn["name"] = message.name
    return turn


def _hf_tool(tool: ToolSpec) -> dict[str, Any]:
    """A tool in the OpenAI shape chat templates read."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }
