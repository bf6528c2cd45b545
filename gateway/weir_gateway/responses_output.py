"""Building a /v1/responses answer from Generate stream messages: its output items, the streaming events that
tell them, and the final response object; the JSON and SSE answers come from this one builder, so they agree.

Output items open in the order their output starts (reasoning, then the message, then each function call);
a reasoning or message item closes when output of another kind starts, calls close when the choice ends,
carrying the complete call the server reported.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from weir.v1 import inference_pb2 as pb
from weir_gateway.errors import ApiError
from weir_gateway.generation import finish_reason

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    """A fresh id in OpenAI's style: resp_..., msg_..., fc_..., rs_..."""
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class OutputItem:
    """One output item as it grows: reasoning or message text, or a function call's arguments."""

    kind: str  # "reasoning" | "message" | "function_call"
    id: str
    output_index: int
    parts: list[str] = field(default_factory=list)  # text pieces, or argument pieces of a call
    call_id: str = ""
    name: str = ""
    status: str = "in_progress"

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def part(self) -> dict[str, Any]:
        """The item's one content part (reasoning and message items)."""
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def as_json(self, *, with_content: bool = True) -> dict[str, Any]:
        """The item as `output` holds it (`with_content=False`: as it is first announced)."""
        if self.kind == "function_call":
            return {"type": "function_call", "id": self.id, "call_id": self.call_id, "name": self.name,
                    "arguments": self.text if with_content else "", "status": self.status}  # fmt: skip
        content = [self.part()] if with_content else []
        if self.kind == "reasoning":
            return {"type": "reasoning", "id": self.id, "summary": [], "content": content}
        return {"type": "message", "id": self.id, "role": "assistant", "status": self.status, "content": content}


class ResponseBuilder:
    """Turns one choice's stream messages into output items and events; `body()` is the response object."""

    def __init__(self, response_id: str, model: str, settings: dict[str, Any]) -> None:
        self.response_id = response_id
        self.model = model
        self.settings = settings  # the request fields the response repeats (instructions, tools, ...)
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.status = "in_progress"
        self.items: list[OutputItem] = []
        self.usage: pb.Usage | None = None
        self._sequence = 0
        self._text_item: OutputItem | None = None  # the open reasoning or message item
        self._calls: dict[int, OutputItem] = {}  # by the call's index in the choice

    def observe_model(self, message: pb.GenerateResponse) -> None:
        """Name the model that served the request, once a message says which."""
        if message.model:
            self.model = message.model

    def start(self) -> list[Event]:
        """The events that open a stream."""
        snapshot = self.body()
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]  # fmt: skip

    def add(self, message: pb.GenerateResponse) -> list[Event]:
        """Take one stream message; return the events that tell its output."""
        self.observe_model(message)
        events: list[Event] = []
        if message.reasoning_text:
            events += self._text("reasoning", message.reasoning_text)
        if message.text:
            events += self._text("message", message.text)
        for delta in message.tool_call_deltas:
            events += self._call_delta(delta.index, delta.id, delta.name, delta.arguments)
        if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            events += self._finish(message)
        return events

    def finish(self) -> list[Event]:
        """The event that ends a stream: the response, completed or incomplete."""
        if self.completed_at is None:
            raise ApiError(502, "the backend ended the stream before the response finished")
        return [self._event(f"response.{self.status}", response=self.body())]

    def error_event(self, error: ApiError) -> Event:
        """The `error` event that ends a stream which failed after it started."""
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def body(self) -> dict[str, Any]:
        """The response object as it stands."""
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "completed_at": self.completed_at,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": [item.as_json() for item in self.items],
            "usage": self._usage(),
            **self.settings,
        }

    def output_turn(self) -> pb.ChatMessage:
        """The output as the assistant turn a continuation of this response starts from (reasoning left out)."""
        text = "".join(item.text for item in self.items if item.kind == "message")
        calls = [item for item in self.items if item.kind == "function_call"]
        return pb.ChatMessage(
            role="assistant",
            content=text,
            tool_calls=[pb.ToolCall(id=c.call_id, name=c.name, arguments=c.text, index=i) for i, c in enumerate(calls)],
        )

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _open(self, kind: str, prefix: str, call_id: str = "", name: str = "") -> tuple[OutputItem, Event]:
        item = OutputItem(kind, new_id(prefix), len(self.items), call_id=call_id, name=name)
        self.items.append(item)
        added = self._event("response.output_item.added", output_index=item.output_index,
                            item=item.as_json(with_content=False))  # fmt: skip
        return item, added

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        item = self._text_item
        if item is None or item.kind != kind:
            events += self._close_text("completed")
            item, added = self._open(kind, "rs" if kind == "reasoning" else "msg")
            part = self._event("response.content_part.added", item_id=item.id, output_index=item.output_index,
                               content_index=0, part=item.part())  # fmt: skip
            events += [added, part]
            self._text_item = item
        item.parts.append(text)
        if kind == "reasoning":
            delta = self._event("response.reasoning_text.delta", item_id=item.id, output_index=item.output_index,
                                content_index=0, delta=text)  # fmt: skip
        else:
            delta = self._event("response.output_text.delta", item_id=item.id, output_index=item.output_index,
                                content_index=0, delta=text, logprobs=[])  # fmt: skip
        return [*events, delta]

    def _close_text(self, status: str) -> list[Event]:
        item, self._text_item = self._text_item, None
        if item is None:
            return []
        item.status = status
        where = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
        if item.kind == "reasoning":
            done = self._event("response.reasoning_text.done", **where, text=item.text)
        else:
            done = self._event("response.output_text.done", **where, text=item.text, logprobs=[])
        return [
            done,
            self._event("response.content_part.done", **where, part=item.part()),
            self._event("response.output_item.done", output_index=item.output_index, item=item.as_json()),
        ]

    def _call_delta(self, index: int, call_id: str, name: str, arguments: str) -> list[Event]:
        events: list[Event] = []
        item = self._calls.get(index)
        if item is None:
            events += self._close_text("completed")
            item, added = self._open("function_call", "fc", call_id or new_id("call"), name)
            self._calls[index] = item
            events.append(added)
        if arguments:
            item.parts.append(arguments)
            events.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                      output_index=item.output_index, delta=arguments))  # fmt: skip
        return events

    def _finish(self, message: pb.GenerateResponse) -> list[Event]:
        """Close every item; the complete calls of the choice's last message replace what their deltas told, and
        only a call not among them can have been cut short."""
        if message.finish_reason in (pb.FINISH_REASON_CANCELLED, pb.FINISH_REASON_ERROR):
            finish_reason(message)  # raises the ApiError a cancelled or failed choice is answered with
        status = "incomplete" if message.finish_reason == pb.FINISH_REASON_LENGTH else "completed"
        events: list[Event] = []
        complete = set()
        for call in message.tool_calls:
            complete.add(call.index)
            if call.index in self._calls:
                self._calls[call.index].parts = [call.arguments]
            else:  # a call the server reported only complete
                events += self._call_delta(call.index, call.id, call.name, call.arguments)
        events += self._close_text(status)
        for index, item in sorted(self._calls.items(), key=lambda entry: entry[1].output_index):
            item.status = "completed" if index in complete else status
            events.append(self._event("response.function_call_arguments.done", item_id=item.id,
                                      output_index=item.output_index, arguments=item.text))  # fmt: skip
            events.append(self._event("response.output_item.done", output_index=item.output_index,
                                      item=item.as_json()))  # fmt: skip
        self._calls = {}
        if message.HasField("usage"):
            self.usage = message.usage
        self.status = status
        self.completed_at = int(time.time())
        return events

    def _usage(self) -> dict[str, Any] | None:
        if self.usage is None:
            return None
        prompt, completion = self.usage.prompt_tokens, self.usage.completion_tokens
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": self.usage.cached_tokens},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},  # the server does not count them apart
            "total_tokens": prompt + completion,
        }
