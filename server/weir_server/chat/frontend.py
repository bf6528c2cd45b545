"""A served model's chat front end: renders a chat request into a prompt and the output constraint its tools
need, and makes each choice's output parser."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from weir_server.chat.encoding import ChatEncoder
from weir_server.chat.messages import ChatMessage
from weir_server.chat.output import ChoiceParser
from weir_server.chat.template import ChatTemplate
from weir_server.chat.tools import ToolRequest
from weir_server.config import TOOL_CALL_PARSER_AUTO, ChatConfig
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError
from weir_server.parsers import structural
from weir_server.parsers.reasoning_parser import ReasoningParser, get_reasoning_parser
from weir_server.parsers.tool_parser import ToolParser, detect_tool_parser, get_tool_parser
from weir_server.tokenization import Checkpoint, keep_going

logger = logging.getLogger(__name__)
GENERIC_TOOL_PARSER = "hermes"  # the format generic_tools.py asks for
FALLBACK_TOOL_PARSER = "json"  # a template that knows tools in a format no parser recognises


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat request: its prompt text and token ids, the constraint its tools put on the output, and what
    parses it."""

    text: str
    token_ids: list[int]
    constraint: Constraint | None
    tools: ToolRequest | None
    tool_parser: type[ToolParser] | None
    reasoning_parser: type[ReasoningParser] | None

    def choice_parser(self) -> ChoiceParser | None:
        """A fresh parser for one choice, or None when the output is plain text."""
        reasoning = self.reasoning_parser(self.text) if self.reasoning_parser is not None else None
        tools = None
        if self.tool_parser is not None and self.tools is not None and self.tools.calls_allowed:
            tools = self.tool_parser(self.tools.tools)
        if reasoning is None and tools is None:
            return None
        return ChoiceParser(reasoning, tools)


class ChatFrontend:
    """Chat for one model: its template, its tool-call format and its reasoning format."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ChatConfig) -> None:
        self.template = ChatTemplate(tokenizer, config.chat_template)
        self.encoder = ChatEncoder(tokenizer, self.template.source)
        self.tool_parser = get_tool_parser(self._tool_parser_name(config))
        self.reasoning_parser = (
            get_reasoning_parser(config.reasoning_parser) if config.reasoning_parser is not None else None
        )

    def _tool_parser_name(self, config: ChatConfig) -> str:
        if config.tool_call_parser != TOOL_CALL_PARSER_AUTO:
            return config.tool_call_parser
        if not self.template.knows_tools:
            return GENERIC_TOOL_PARSER
        detected = detect_tool_parser(self.template.source)
        if detected is None:
            logger.info(
                "the chat template's tool-call format is not one Weir recognises; reading calls as JSON "
                "(set --tool-call-parser to choose)"
            )
            return FALLBACK_TOOL_PARSER
        return detected

    @property
    def has_template(self) -> bool:
        return self.template.available

    def render(
        self,
        messages: Sequence[ChatMessage],
        tools: ToolRequest | None = None,
        add_generation_prompt: bool = True,
        kwargs: Mapping[str, Any] | None = None,
        answer: Constraint | None = None,
        checkpoint: Checkpoint = keep_going,
    ) -> ChatPrompt:
        """The prompt and output constraint of a chat request; raises InvalidRequestError naming the field.
        `answer` constrains the text: alone without calls, as the alternative to calls in auto mode, and not at
        all when a call is required. Control tokens in the request's strings are encoded as text (chat/encoding.py);
        `checkpoint` is called between the steps, to stop a request whose caller is gone."""
        specs = tools.tools if tools else ()
        marked = self.template.render(messages, specs, add_generation_prompt, kwargs, mark=self.encoder.mark)
        checkpoint()
        text, token_ids = self.encoder.encode(marked, checkpoint)
        checkpoint()
        reasoning = self.reasoning_parser(text) if self.reasoning_parser is not None else None
        constraint = answer
        if tools is not None and tools.calls_allowed:
            prefix = reasoning.structural_prefix() if reasoning is not None else None
            tag = self._tool_tag(tools, prefix, answer)
            if tag is not None:
                constraint = Constraint("structural_tag", json.dumps(tag, ensure_ascii=False))
        return ChatPrompt(text, token_ids, constraint, tools, self.tool_parser, self.reasoning_parser)

    def _tool_tag(
        self, tools: ToolRequest, prefix: dict[str, Any] | None, answer: Constraint | None
    ) -> dict[str, Any] | None:
        """The structural tag for the calls; in auto mode with an answer constraint: calls, or that answer."""
        parser = self.tool_parser
        if answer is None or tools.mode != "auto" or tools.forced is not None:
            return parser.structural_tag(tools.tools, tools.mode, tools.forced, prefix, tools.parallel)
        calls = parser.structural_tag(tools.tools, "required", None, None, tools.parallel)
        if calls is None:  # a format Weir cannot constrain: the answer's shape is the one kept
            return None
        try:
            text = structural.answer_format(answer.kind, answer.value)
        except (ValueError, RecursionError) as e:
            raise InvalidRequestError(answer.kind, f"is not valid: {e}") from None
        body = structural.any_of([calls["format"], text])
        return structural.structural_tag(body, prefix)
