"""The gateway's memory of /v1/responses objects: a bounded LRU with a time to live, for GET, DELETE and
`previous_response_id`.

It lives in one gateway process and is not shared: behind several gateway replicas (a load balancer, a
Kubernetes Service), a response stored by one replica is unknown to the others, so a client that continues a
conversation with `previous_response_id` must reach the same replica (sticky sessions) or send the whole
conversation as `input` instead. Nothing survives a restart. The bound counts responses, not bytes; earlier
turns of a conversation are shared between the responses that continue it, not copied.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.state import CONFIG


@dataclass(frozen=True)
class StoredResponse:
    """A finished response as GET returns it, and the conversation a continuation of it starts from."""

    body: dict[str, Any]  # the response object; never mutated once stored
    conversation: tuple[pb.ChatMessage, ...]  # every turn but the instructions, its own output last
    expires_at: float

    def call_names(self) -> dict[str, str]:
        """The function name of each call id the conversation made, for the tool results that answer them."""
        return {call.id: call.name for turn in self.conversation for call in turn.tool_calls}


class ResponseStore:
    """At most `size` responses, each readable for `ttl_s` seconds after it was stored; the least recently
    used goes first when full. GatewayConfig checks both limits."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, body: dict[str, Any], conversation: tuple[pb.ChatMessage, ...]) -> None:
        """Keep a response (a no-op when the store holds none), dropping expired ones, then the least recent."""
        if self.size == 0:
            return
        now = self._clock()
        self._drop_expired(now)
        self._entries[response_id] = StoredResponse(body, conversation, now + self.ttl_s)
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None when it was never stored, was deleted, evicted or has expired."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._entries[response_id]
            return None
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        """Forget a response; False when there was none to forget."""
        return self.get(response_id) is not None and self._entries.pop(response_id, None) is not None

    def _drop_expired(self, now: float) -> None:
        # Entries expire in insertion order only when nothing was read, so scan rather than stop early; the
        # scan is bounded by `size` and only runs when a response is stored.
        for response_id in [k for k, entry in self._entries.items() if entry.expires_at <= now]:
            del self._entries[response_id]


RESPONSE_STORE = web.AppKey("response_store", ResponseStore)


def install_response_store(app: web.Application) -> None:
    """Give the app its store, sized by its config (call after the config is set)."""
    config = app[CONFIG]
    app[RESPONSE_STORE] = ResponseStore(config.response_store_size, config.response_store_ttl_s)
