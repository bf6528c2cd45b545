"""The cost model at admission: each input that buys work is measured against the server's limits before the work
starts, and refused INVALID_ARGUMENT naming the field and the limit. Only counts and sizes are read here (no text is
scanned beyond the limit), so it runs on the event loop; the work itself runs on workers (api/workers.py)."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message

from weir.v1 import inference_pb2 as pb
from weir_server.api.model_registry import ServedModel
from weir_server.config import LimitsConfig
from weir_server.errors import InvalidRequestError


class Admission:
    """Checks requests against one server's LimitsConfig."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits

    def generate(self, request: pb.GenerateRequest, model: ServedModel) -> None:
        """A GenerateRequest's prompt, conversation, tools and template variables."""
        limits = self.limits
        context = model.loaded.max_model_len
        kind = request.WhichOneof("input")
        if kind == "prompt":
            self.text("prompt", (request.prompt,))
            model.tokenizer.check_text_length(request.prompt, "prompt", context)
        elif kind == "token_ids":
            check_context("token_ids", len(request.token_ids.ids), context)
        elif kind == "messages":
            size = self._conversation(request.messages)
            model.tokenizer.check_chars(size + self._tools(request), "messages", context)
        kwargs = request.chat_template_kwargs
        if kwargs:
            size = len(kwargs.encode()) if len(kwargs) <= limits.max_chat_template_kwargs_bytes else len(kwargs)
            check_at_most("chat_template_kwargs", size, limits.max_chat_template_kwargs_bytes, "bytes", _KWARGS_FLAG)
        params = request.sampling_params
        for name in ("logprobs", "prompt_logprobs"):
            if params.HasField(name):
                value = getattr(params, name)
                check_at_most(f"sampling_params.{name}", value, limits.max_logprobs, "alternatives", "--max-logprobs")

    def _conversation(self, messages: pb.ChatMessages) -> int:
        """The conversation's size in bytes, once its count of turns, parts and calls is checked."""
        limit = self.limits.max_chat_messages
        turns = messages.messages
        check_at_most("messages", len(turns), limit, "turns", _MESSAGES_FLAG)
        items = len(turns) + sum(len(m.content_parts) + len(m.tool_calls) for m in turns)
        check_at_most("messages", items, limit, "turns, content parts and tool calls", _MESSAGES_FLAG)
        size = messages.ByteSize()
        check_at_most("messages", size, self.limits.max_text_bytes, "bytes", _TEXT_FLAG)
        return size

    def _tools(self, request: pb.GenerateRequest) -> int:
        tools = request.tools
        check_at_most("tools", len(tools), self.limits.max_tools, "tools", "--max-tools")
        size = sum(tool.ByteSize() for tool in tools)
        check_at_most("tools", size, self.limits.max_tools_bytes, "bytes", "--max-tools-bytes")
        return size

    def tokenize(self, request: pb.TokenizeRequest) -> None:
        self.inputs("texts", len(request.texts))
        self.text("texts", request.texts)

    def detokenize(self, request: pb.DetokenizeRequest) -> None:
        sequences = request.sequences
        self.inputs("sequences", len(sequences))
        ids = sum(len(s.ids) for s in sequences)
        check_at_most("sequences", ids, self.limits.max_detokenize_ids, "token ids", "--max-detokenize-ids")

    def embed(self, request: pb.EmbedRequest, model: ServedModel) -> None:
        """Embed inputs: their count, the texts' bytes, and (unless truncated) each token id input's length."""
        if request.texts:
            self.inputs("texts", len(request.texts))
            self.text("texts", request.texts)
        self.inputs("token_ids", len(request.token_ids))
        if not request.truncate:
            context = model.loaded.max_model_len
            for i, ids in enumerate(request.token_ids):
                if len(ids.ids) > context:
                    raise InvalidRequestError(
                        f"token_ids[{i}]", f"has {len(ids.ids)} tokens, more than the model's maximum of {context}"
                    )

    def inputs(self, field: str, count: int) -> None:
        check_at_most(field, count, self.limits.max_inputs, "inputs", "--max-inputs")

    def text(self, field: str, texts: Iterable[str]) -> None:
        """The UTF-8 bytes of `texts` together, counted only until they pass the limit."""
        limit = self.limits.max_text_bytes
        total = 0
        for text in texts:
            total += len(text) if len(text) > limit else len(text.encode())  # bytes >= characters
            if total > limit:
                raise InvalidRequestError(
                    field, f"holds at least {total} bytes of text; the limit is {limit} bytes ({_TEXT_FLAG})"
                )

    def reply(self, reply: Message, field: str) -> None:
        """A reply the client could not receive is refused with what to change, not failed by gRPC after the work."""
        size = reply.ByteSize()
        limit = self.limits.max_message_bytes
        if size > limit:
            raise InvalidRequestError(
                field, f"the reply would be {size} bytes; the limit is {limit} bytes (--max-message-bytes): send less"
            )


_TEXT_FLAG = "--max-text-bytes"
_MESSAGES_FLAG = "--max-chat-messages"
_KWARGS_FLAG = "--max-chat-template-kwargs-bytes"


def check_at_most(field: str, value: int, limit: int, unit: str, flag: str) -> None:
    """Refuse `field` when `value` (in `unit`) is over `limit`, naming the limit and the flag that sets it."""
    if value > limit:
        raise InvalidRequestError(field, f"has {value} {unit}; the limit is {limit} {unit} ({flag})")


def check_context(field: str, tokens: int, context: int) -> None:
    """A prompt of `tokens` leaves no room for output in a `context`-token model."""
    if tokens >= context:
        raise InvalidRequestError(
            field, f"is {tokens} tokens long; this model's context is {context} tokens including the output"
        )
