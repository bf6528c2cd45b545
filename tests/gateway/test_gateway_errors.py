"""Backend failures become the right HTTP status and OpenAI error; request ids, deadlines, auth and CORS."""

from __future__ import annotations

import json

import grpc
from gateway_fakes import GEN_MODEL
from gateway_support import RunningGateway, http

from weir_gateway.config import GatewayConfig
from weir_gateway.errors import GRPC_TO_HTTP

COMPLETIONS = "/v1/completions"


def complete(gateway: RunningGateway, prompt: str, headers: dict[str, str] | None = None, **fields):
    body = {"model": GEN_MODEL, "prompt": prompt, "max_tokens": 3} | fields
    return http("POST", gateway.url + COMPLETIONS, body, headers)


def sse_events(body: bytes) -> list[str]:
    return [line[len("data: ") :] for line in body.decode().split("\n\n") if line.startswith("data: ")]


def test_every_grpc_status_has_one_http_status() -> None:
    assert set(GRPC_TO_HTTP) == set(grpc.StatusCode)
    assert GRPC_TO_HTTP[grpc.StatusCode.INVALID_ARGUMENT][0] == 400
    assert GRPC_TO_HTTP[grpc.StatusCode.NOT_FOUND][0] == 404
    assert GRPC_TO_HTTP[grpc.StatusCode.RESOURCE_EXHAUSTED][0] == 429
    assert GRPC_TO_HTTP[grpc.StatusCode.UNAVAILABLE][0] == 503
    assert GRPC_TO_HTTP[grpc.StatusCode.DEADLINE_EXCEEDED][0] == 504


def test_backend_invalid_argument_is_400_naming_the_openai_field(gateway: RunningGateway) -> None:
    reply = complete(gateway, "FAIL_INVALID")
    assert reply.status == 400
    assert reply.json()["error"]["param"] == "temperature"
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_backend_resource_exhausted_is_429_with_retry_after(gateway: RunningGateway) -> None:
    reply = complete(gateway, "FAIL_EXHAUSTED")
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "3"


def test_error_after_stream_started_is_an_error_event_that_ends_the_stream(gateway: RunningGateway) -> None:
    reply = complete(gateway, "FAIL_MIDWAY", stream=True, max_tokens=5)
    assert reply.status == 200
    events = sse_events(reply.body)
    assert json.loads(events[0])["choices"][0]["text"] == " c0t0"
    assert json.loads(events[-1])["error"]["type"] == "server_error"
    assert "[DONE]" not in events


def test_error_before_any_output_keeps_its_status_on_streams(gateway: RunningGateway) -> None:
    reply = complete(gateway, "FAIL_INVALID", stream=True)
    assert reply.status == 400
    assert reply.json()["error"]["param"] == "temperature"


def test_client_request_id_is_returned_and_sent_as_metadata(gateway: RunningGateway, fake) -> None:
    reply = complete(gateway, "hi", headers={"X-Request-Id": "trace-42"})
    assert reply.headers["X-Request-Id"] == "trace-42"
    assert reply.json()["id"] == "cmpl-trace-42"
    assert fake.servicer.request_ids[-1] == "trace-42"


def test_request_id_is_assigned_when_absent_or_unsafe(gateway: RunningGateway) -> None:
    assert len(complete(gateway, "hi").headers["X-Request-Id"]) == 32
    unsafe = complete(gateway, "hi", headers={"X-Request-Id": "x" * 500})
    assert unsafe.headers["X-Request-Id"] != "x" * 500


def test_request_timeout_becomes_a_deadline_and_a_504(gateway: RunningGateway, fake) -> None:
    reply = complete(gateway, "SLOW", headers={"X-Request-Timeout": "0.2"}, max_tokens=60)
    assert reply.status == 504
    assert fake.servicer.deadlines[-1] is not None and fake.servicer.deadlines[-1] <= 0.25


def test_every_call_carries_the_configured_deadline(gateway: RunningGateway, fake) -> None:
    complete(gateway, "hi")
    assert GatewayConfig().request_timeout_s - 5 < fake.servicer.deadlines[-1] < GatewayConfig().request_timeout_s + 2


def test_no_reachable_backend_is_503(make_gateway) -> None:
    gateway = make_gateway(GatewayConfig(backends=("127.0.0.1:9",), health_retry_s=0.1), wait_serving=False)
    reply = complete(gateway, "hi")
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "backend_unavailable"
    assert http("GET", gateway.url + "/health").status == 503
    assert http("GET", gateway.url + "/v1/models").status == 503


def test_api_keys_are_required_when_configured(make_gateway, fake) -> None:
    gateway = make_gateway(GatewayConfig(backends=(fake.address,), api_keys=("k1", "secret-2")))
    assert complete(gateway, "hi").status == 401
    assert complete(gateway, "hi", headers={"Authorization": "Bearer nope"}).status == 401
    assert complete(gateway, "hi", headers={"Authorization": "Basic secret-2"}).status == 401
    assert complete(gateway, "hi", headers={"Authorization": "Bearer secret-2"}).status == 200
    assert http("GET", gateway.url + "/v1/models").json()["error"]["type"] == "authentication_error"
    assert http("GET", gateway.url + "/health").status == 200


def test_cors_is_off_by_default(gateway: RunningGateway) -> None:
    reply = http("GET", gateway.url + "/v1/models", headers={"Origin": "http://app.example"})
    assert "Access-Control-Allow-Origin" not in reply.headers


def test_cors_allows_configured_origins(make_gateway, fake) -> None:
    gateway = make_gateway(GatewayConfig(backends=(fake.address,), cors_origins=("http://app.example",)))
    preflight = http("OPTIONS", gateway.url + COMPLETIONS, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    reply = complete(gateway, "hi", headers={"Origin": "http://app.example"})
    assert reply.headers["Access-Control-Allow-Origin"] == "http://app.example"
    other = complete(gateway, "hi", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cors_preflight_allows_deleting_a_stored_response(make_gateway, fake) -> None:
    gateway = make_gateway(GatewayConfig(backends=(fake.address,), cors_origins=("http://app.example",)))
    preflight = http("OPTIONS", gateway.url + "/v1/responses/resp_1", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "DELETE"})  # fmt: skip
    assert preflight.status == 204
    assert "DELETE" in [m.strip() for m in preflight.headers["Access-Control-Allow-Methods"].split(",")]
    reply = http("DELETE", gateway.url + "/v1/responses/resp_1", headers={"Origin": "http://app.example"})
    assert reply.status == 404 and reply.headers["Access-Control-Allow-Origin"] == "http://app.example"


def test_health_and_version(gateway: RunningGateway, fake) -> None:
    health = http("GET", gateway.url + "/health")
    assert health.status == 200
    assert health.json()["backends"] == {fake.address: "SERVING"}
    assert http("GET", gateway.url + "/version").json()["version"]


def test_backend_going_not_serving_turns_health_503(make_fake, make_gateway, background) -> None:
    from grpc_health.v1 import health_pb2

    fake = make_fake()
    gateway = make_gateway(GatewayConfig(backends=(fake.address,)))
    background.run(fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    assert background.run(_eventually(lambda: not gateway.pool.backends[0].serving))
    assert http("GET", gateway.url + "/health").status == 503
    assert complete(gateway, "hi").status == 503
    background.run(fake.health.set("", health_pb2.HealthCheckResponse.SERVING))
    assert background.run(gateway.pool.wait_serving(5))
    assert complete(gateway, "hi").status == 200


async def _eventually(predicate, timeout: float = 5.0) -> bool:
    import asyncio

    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()
