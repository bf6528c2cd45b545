"""Several backends: least-outstanding balancing, health-based skipping, dying backends; client disconnects."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from gateway_fakes import GEN_MODEL
from gateway_support import http as request

from weir_gateway.config import GatewayConfig


def slow_body(stream: bool, max_tokens: int = 40) -> dict:
    return {"model": GEN_MODEL, "prompt": "SLOW", "max_tokens": max_tokens, "stream": stream}


def open_stream(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start a streaming completion and return once its first event arrived."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return conn, response


def read_events(response: http.client.HTTPResponse) -> list[str]:
    text = response.read().decode()
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_requests_go_to_the_backend_with_fewest_outstanding(make_fake, make_gateway) -> None:
    fakes = [make_fake(), make_fake()]
    gateway = make_gateway(GatewayConfig(backends=tuple(f.address for f in fakes), routing="least-load"))
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: request("POST", gateway.url + "/v1/completions", slow_body(False, 10)),
                                range(4)))  # fmt: skip
    assert all(r.status == 200 for r in replies)
    assert [f.servicer.calls for f in fakes] == [2, 2]


def test_busy_backend_is_avoided(make_fake, make_gateway) -> None:
    fakes = [make_fake(), make_fake()]
    gateway = make_gateway(GatewayConfig(backends=tuple(f.address for f in fakes), routing="least-load"))
    conn, _ = open_stream(gateway.url, slow_body(True, 100))
    busy = next(f for f in fakes if f.servicer.active)
    idle = next(f for f in fakes if f is not busy)
    for _ in range(3):
        assert request("POST", gateway.url + "/v1/completions", {"model": GEN_MODEL, "prompt": "x"}).status == 200
    assert (busy.servicer.calls, idle.servicer.calls) == (1, 3)
    conn.close()


def test_dying_backend_fails_only_its_requests_and_new_ones_go_elsewhere(make_fake, make_gateway, background) -> None:
    fakes = [make_fake(), make_fake()]
    gateway = make_gateway(GatewayConfig(backends=tuple(f.address for f in fakes), health_retry_s=0.2,
                                         routing="least-load"))  # fmt: skip
    streams = [open_stream(gateway.url, slow_body(True, 30)) for _ in range(2)]
    assert [f.servicer.active for f in fakes] == [1, 1]
    background.run(fakes[0].stop())
    last_events = [read_events(response)[-1] for _, response in streams]
    outcomes = sorted("ok" if last == "[DONE]" else json.loads(last)["error"]["type"] for last in last_events)
    assert outcomes == ["ok", "service_unavailable"]
    for _ in range(4):
        reply = request("POST", gateway.url + "/v1/completions", {"model": GEN_MODEL, "prompt": "x", "max_tokens": 2})
        assert reply.status == 200
    assert fakes[1].servicer.calls == 5
    for conn, _ in streams:
        conn.close()


def test_unreachable_backend_is_routed_around_before_health_notices(make_fake, make_gateway, background) -> None:
    fakes = [make_fake(), make_fake()]
    gateway = make_gateway(GatewayConfig(backends=tuple(f.address for f in fakes), health_retry_s=30))
    background.run(fakes[0].stop())
    gateway.pool.backends[0].serving = True  # as if its health stream had not broken yet
    for _ in range(3):
        reply = request("POST", gateway.url + "/v1/completions", {"model": GEN_MODEL, "prompt": "x", "max_tokens": 2})
        assert reply.status == 200


def test_client_disconnect_cancels_the_stream_call(make_fake, make_gateway) -> None:
    fake = make_fake()
    gateway = make_gateway(GatewayConfig(backends=(fake.address,)))
    conn, _ = open_stream(gateway.url, slow_body(True, 200))
    assert fake.servicer.active == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: fake.servicer.cancelled == 1 and fake.servicer.active == 0, timeout=2)
    assert wait_until(lambda: gateway.pool.backends[0].outstanding == 0)


def test_client_disconnect_cancels_a_non_streaming_call(make_fake, make_gateway) -> None:
    fake = make_fake()
    gateway = make_gateway(GatewayConfig(backends=(fake.address,)))
    parts = urlsplit(gateway.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(slow_body(False, 200)), {"Content-Type": "application/json"})
    assert wait_until(lambda: fake.servicer.active == 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: fake.servicer.cancelled == 1 and fake.servicer.active == 0, timeout=2)


def test_multiple_prompts_are_merged_with_offset_indexes(gateway) -> None:
    body = {"model": GEN_MODEL, "prompt": ["a", "b c"], "n": 2, "max_tokens": 2}
    reply = request("POST", gateway.url + "/v1/completions", body).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in reply["choices"]] == [" c0t0 c0t1", " c1t0 c1t1", " c0t0 c0t1", " c1t0 c1t1"]
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                              "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
