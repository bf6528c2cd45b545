"""Malformed bodies get a 4xx OpenAI error naming the field; the gateway keeps serving afterwards."""

from __future__ import annotations

import pytest
from gateway_cases import malformed_requests
from gateway_fakes import EMBED_MODEL, GEN_MODEL
from gateway_support import RunningGateway, http

from weir_gateway.config import GatewayConfig

CASES = malformed_requests(GEN_MODEL, EMBED_MODEL, GatewayConfig().max_body_bytes)


def assert_refused(gateway: RunningGateway, case) -> None:
    reply = http(case.method, gateway.url + case.path, case.body)
    assert reply.status == case.status, (case.name, reply.body[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, case.name
    assert error["message"], case.name
    if case.param is not None:
        assert error["param"] == case.param, (case.name, error)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_request_gets_a_4xx_json_error(gateway: RunningGateway, case) -> None:
    assert_refused(gateway, case)


def test_gateway_still_serves_after_malformed_requests(gateway: RunningGateway) -> None:
    for case in CASES[:10]:
        assert_refused(gateway, case)
    reply = http("POST", gateway.url + "/v1/completions", {"model": GEN_MODEL, "prompt": "hi", "max_tokens": 2})
    assert reply.status == 200
    assert http("GET", gateway.url + "/health").status == 200


def test_null_counts_as_absent(gateway: RunningGateway) -> None:
    body = {"model": GEN_MODEL, "prompt": "hi", "max_tokens": 2, "logit_bias": None, "stop": None, "seed": None}
    assert http("POST", gateway.url + "/v1/completions", body).status == 200


def test_response_format_text_is_accepted(gateway: RunningGateway) -> None:
    body = {"model": GEN_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "response_format": {"type": "text"}}  # fmt: skip
    assert http("POST", gateway.url + "/v1/chat/completions", body).status == 200
