"""The response store: bounded by count, least recently used first out, each entry readable for its lifetime."""

from __future__ import annotations

import pytest

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.response_store import ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def body(response_id: str) -> dict[str, str]:
    return {"id": response_id}


def test_stored_response_is_returned_with_its_conversation() -> None:
    store = ResponseStore(4, 60)
    turn = pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c1", name="f", arguments="{}")])
    store.put("resp_a", body("resp_a"), (pb.ChatMessage(role="user", content="hi"), turn))
    entry = store.get("resp_a")
    assert entry is not None and entry.body == body("resp_a")
    assert [t.role for t in entry.conversation] == ["user", "assistant"]
    assert entry.call_names() == {"c1": "f"}


def test_the_least_recently_used_response_goes_first_when_full() -> None:
    store = ResponseStore(2, 60)
    store.put("a", body("a"), ())
    store.put("b", body("b"), ())
    assert store.get("a") is not None  # a is now more recent than b
    store.put("c", body("c"), ())
    assert store.get("b") is None
    assert store.get("a") is not None and store.get("c") is not None
    assert len(store) == 2


def test_a_response_expires_after_its_lifetime() -> None:
    clock = Clock()
    store = ResponseStore(4, 60, clock)
    store.put("a", body("a"), ())
    clock.now += 59
    assert store.get("a") is not None  # reading does not extend the lifetime
    clock.now += 1
    assert store.get("a") is None and len(store) == 0


def test_storing_drops_expired_responses() -> None:
    clock = Clock()
    store = ResponseStore(4, 60, clock)
    store.put("a", body("a"), ())
    clock.now += 61
    store.put("b", body("b"), ())
    assert len(store) == 1


def test_delete_forgets_once() -> None:
    store = ResponseStore(4, 60)
    store.put("a", body("a"), ())
    assert store.delete("a") is True
    assert store.get("a") is None
    assert store.delete("a") is False


def test_a_store_of_size_zero_keeps_nothing() -> None:
    store = ResponseStore(0, 60)
    store.put("a", body("a"), ())
    assert store.get("a") is None


@pytest.mark.parametrize(
    ("size", "ttl_s", "message"),
    [(-1, 60.0, "response_store_size must be >= 0"), (4, 0.0, "response_store_ttl_s must be positive"),
     (4, -5.0, "response_store_ttl_s must be positive")],
)  # fmt: skip
def test_nonsense_limits_are_an_invalid_config(size: int, ttl_s: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayConfig(response_store_size=size, response_store_ttl_s=ttl_s)
