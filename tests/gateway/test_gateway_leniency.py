"""Fields that change nothing a client relies on are accepted and ignored (logged once at debug level), as vLLM
does; `weir gateway --strict` refuses them, and fields whose loss would change the result are refused always."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest
from gateway_fakes import GEN_MODEL
from gateway_support import RunningGateway, http

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = {"role": "user", "content": "hi"}
IGNORED_CHAT_FIELDS = {
    "store": True,
    "metadata": {"team": "agents"},
    "service_tier": "auto",
    "user": "user-1",
    "reasoning_effort": "low",
    "verbosity": "low",
    "prediction": {"type": "content", "content": "hi"},
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "guided_decoding_backend": "xgrammar",
    "stream_options": None,  # null is absent, in both modes
    "some_vendor_extra": {"anything": [1, 2]},
}
IGNORED_MESSAGE_FIELDS = {"refusal": None, "reasoning_content": "I thought.", "reasoning": "I thought.", "x_extra": 1}


def base_body(path: str) -> dict[str, Any]:
    if path == CHAT:
        return {"model": GEN_MODEL, "messages": [USER], "max_tokens": 2}
    return {"model": GEN_MODEL, "prompt": "hi", "max_tokens": 2}


def request_seen(gateway: RunningGateway, fake, path: str, body: dict[str, Any]) -> pb.GenerateRequest:
    """What the server received for `body` (its request id cleared, so requests compare by content)."""
    reply = http("POST", gateway.url + path, body)
    assert reply.status == 200, reply.body[:300]
    request = pb.GenerateRequest()
    request.CopyFrom(fake.servicer.requests[-1])
    request.ClearField("request_id")
    return request


@pytest.fixture
def strict_gateway(make_gateway: Callable[..., RunningGateway], fake) -> RunningGateway:
    return make_gateway(GatewayConfig(backends=(fake.address,), max_n=4, max_tokens=64, strict=True))


@pytest.mark.parametrize(("name", "value"), IGNORED_CHAT_FIELDS.items(), ids=list(IGNORED_CHAT_FIELDS))
def test_ignored_chat_fields_change_nothing_the_server_sees(
    gateway: RunningGateway, fake, name: str, value: Any
) -> None:
    plain = request_seen(gateway, fake, CHAT, base_body(CHAT))
    assert request_seen(gateway, fake, CHAT, base_body(CHAT) | {name: value}) == plain


@pytest.mark.parametrize(("name", "value"), IGNORED_MESSAGE_FIELDS.items(), ids=list(IGNORED_MESSAGE_FIELDS))
def test_ignored_message_fields_change_nothing_the_server_sees(
    gateway: RunningGateway, fake, name: str, value: Any
) -> None:
    turns = [USER, {"role": "assistant", "content": "hello"}, USER]
    plain = request_seen(gateway, fake, CHAT, base_body(CHAT) | {"messages": turns})
    turns[1] = turns[1] | {name: value}
    assert request_seen(gateway, fake, CHAT, base_body(CHAT) | {"messages": turns}) == plain


@pytest.mark.parametrize("name", ["user", "metadata", "store", "frobnicate"])
def test_completions_ignore_the_same_fields(gateway: RunningGateway, fake, name: str) -> None:
    plain = request_seen(gateway, fake, COMPLETIONS, base_body(COMPLETIONS))
    value = IGNORED_CHAT_FIELDS.get(name, 1)
    assert request_seen(gateway, fake, COMPLETIONS, base_body(COMPLETIONS) | {name: value}) == plain


def test_each_ignored_field_is_logged_once_at_debug(gateway: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    extra = f"vendor_{uuid.uuid4().hex[:8]}"  # the log is once per process: a name no other test sent
    caplog.set_level(logging.DEBUG, logger="weir_gateway.schema")
    for _ in range(3):
        assert http("POST", gateway.url + CHAT, base_body(CHAT) | {extra: 1}).status == 200
    lines = [r for r in caplog.records if r.name == "weir_gateway.schema" and extra in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG


def test_the_sdk_extras_agents_send_are_accepted(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model=GEN_MODEL, messages=[USER], max_tokens=2, store=False, metadata={"run": "1"}, user="u",
        service_tier="auto", parallel_tool_calls=True, reasoning_effort="low",
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "top_k": 5},
    )  # fmt: skip
    assert completion.choices[0].message.content


@pytest.mark.parametrize(
    ("path", "name", "value"),
    [(CHAT, name, value) for name, value in IGNORED_CHAT_FIELDS.items() if value is not None]
    + [(COMPLETIONS, "user", "u"), (COMPLETIONS, "frobnicate", 1), ("/v1/embeddings", "user", "u")],
)
def test_strict_refuses_ignored_and_unknown_fields_by_name(
    strict_gateway: RunningGateway, path: str, name: str, value: Any
) -> None:
    body = {"model": "fake-embed", "input": "hi"} if path == "/v1/embeddings" else base_body(path)
    reply = http("POST", strict_gateway.url + path, body | {name: value})
    assert reply.status == 400 and reply.json()["error"]["param"] == name


def test_strict_refuses_ignored_message_fields_by_name(strict_gateway: RunningGateway) -> None:
    turns = [USER, {"role": "assistant", "content": "hello", "reasoning_content": "x"}, USER]
    reply = http("POST", strict_gateway.url + CHAT, base_body(CHAT) | {"messages": turns})
    assert reply.status == 400 and reply.json()["error"]["param"] == "messages[1].reasoning_content"


def test_strict_still_serves_what_it_honours(strict_gateway: RunningGateway) -> None:
    body = base_body(CHAT) | {"stream_options": None, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert http("POST", strict_gateway.url + CHAT, body).status == 200
    assert (
        http("POST", strict_gateway.url + COMPLETIONS, base_body(COMPLETIONS) | {"logit_bias": {"1": 1}}).status == 200
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("audio", {"voice": "alloy"}),
        ("modalities", ["audio"]),
        ("web_search_options", {}),
        ("chat_template", "{{ messages }}"),
        ("n", 5),
    ],
)
def test_fields_whose_loss_would_change_the_result_are_refused_in_both_modes(
    gateway: RunningGateway, strict_gateway: RunningGateway, name: str, value: Any
) -> None:
    for running in (gateway, strict_gateway):
        reply = http("POST", running.url + CHAT, base_body(CHAT) | {name: value})
        assert reply.status == 400 and reply.json()["error"]["param"] == name, reply.body
