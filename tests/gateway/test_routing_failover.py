"""Backends that fail or come and go, with real `weir serve` processes: a killed backend's requests move elsewhere,
a failing backend is retried around and ejected (then probed back), and dns:/// backends are re-resolved (new
addresses join, vanished ones drain)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gateway_support import http as request
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from routing_support import TINY_MODEL, ServeProcess, shared_free_port

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_gateway.backends import Backend, BackendPool
from weir_gateway.config import GatewayConfig
from weir_gateway.routing import prefix_key, rendezvous_score

HOSTS = ("127.0.0.1", "127.0.0.2")  # one port on both: the two addresses of a DNS name


@pytest.fixture(scope="module")
def servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServeProcess]]:
    """Two servers on the same port of 127.0.0.1 and 127.0.0.2, started together."""
    port, logs = shared_free_port(*HOSTS), tmp_path_factory.mktemp("logs")
    started = [ServeProcess(tiny_model, host, port, logs / f"{host}.log").spawn() for host in HOSTS]
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for server in started:
            server.kill()


def completion(prompt: str, max_tokens: int = 8) -> dict:
    return {"model": TINY_MODEL, "prompt": prompt, "max_tokens": max_tokens}


def prompts_homed_on(address: str, addresses: list[str], count: int) -> list[str]:
    """Prompts whose cache-aware home among `addresses` is `address`."""
    found = []
    for i in range(1000):
        prompt = f"tenant {i} asks a question " * 8
        key = prefix_key(pb.GenerateRequest(prompt=prompt, model=TINY_MODEL), GatewayConfig().routing_prefix_bytes)
        assert key is not None
        if max(addresses, key=lambda a: rendezvous_score(key, a)) == address:
            found.append(prompt)
            if len(found) == count:
                return found
    raise AssertionError("no prompts found")


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def backend_at(pool: BackendPool, address: str) -> Backend:
    return next(b for b in pool.backends if b.address == address)


def test_killed_backend_fails_only_its_in_flight_requests_and_the_rest_succeed_elsewhere(
    servers, tiny_model, tmp_path, make_gateway
) -> None:
    survivor = servers[0]
    victim = ServeProcess(tiny_model, "127.0.0.1", shared_free_port("127.0.0.1"), tmp_path / "victim.log")
    victim.spawn().wait_ready()
    try:
        addresses = [survivor.target, victim.target]
        gateway = make_gateway(GatewayConfig(backends=tuple(addresses), eject_after=1, eject_s=600))
        prompts = prompts_homed_on(victim.target, addresses, 3)
        killed = threading.Event()
        outcomes: list[tuple[bool, int, str]] = []  # (sent after the kill, status, error code)

        def client(prompt: str) -> None:
            for _ in range(40):
                after = killed.is_set()
                reply = request("POST", gateway.url + "/v1/completions", completion(prompt, 24))
                code = "" if reply.status == 200 else reply.json()["error"]["code"]
                outcomes.append((after, reply.status, code))

        threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: len(outcomes) >= 6)
        victim.kill()
        killed.set()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        victim.kill()
    failed = [o for o in outcomes if o[1] != 200]
    assert len(failed) <= len(prompts), failed  # at most the one each client had in flight at the kill
    assert all(not after and code == "backend_unavailable" for after, _, code in failed), failed
    assert all(status == 200 for after, status, _ in outcomes if after)
    assert not backend_at(gateway.pool, victim.target).available
    health_reply = request("GET", gateway.url + "/health").json()
    assert health_reply["backends"] == {survivor.target: "SERVING", victim.target: "NOT_SERVING"}


class UnavailableEngine(inference_pb2_grpc.InferenceServiceServicer):
    """A server whose health says SERVING while every Generate fails UNAVAILABLE (its engine died)."""

    def __init__(self) -> None:
        self.calls = 0

    async def ListModels(self, request, context):  # noqa: N802 - the gRPC method's name
        return pb.ListModelsResponse()  # no list: the gateway routes any model here

    async def Generate(self, request, context):  # noqa: N802 - the gRPC method's name
        self.calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "engine gone")
        yield pb.GenerateResponse()  # unreachable; makes this an async generator like the real servicer


@pytest.fixture
def unavailable_backend(background) -> Iterator[tuple[str, UnavailableEngine]]:
    engine = UnavailableEngine()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(engine, server)
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return server, port

    server, port = background.run(start())
    yield f"127.0.0.1:{port}", engine
    background.run(server.stop(None))


def test_failure_before_output_is_retried_elsewhere_and_ejects_the_backend_until_its_probe(
    servers, unavailable_backend, make_gateway
) -> None:
    failing, engine = unavailable_backend
    addresses = [servers[0].target, failing]
    config = GatewayConfig(backends=tuple(addresses), eject_after=1, eject_s=0.5, retry_backoff_s=0.01)
    gateway = make_gateway(config)
    assert wait_until(lambda: all(b.available for b in gateway.pool.backends))
    prompt = prompts_homed_on(failing, addresses, 1)[0]

    assert request("POST", gateway.url + "/v1/completions", completion(prompt)).status == 200
    assert engine.calls == 1 and backend_at(gateway.pool, failing).ejected
    # The health probe after the cooldown says SERVING: readmitted, it fails again, and is ejected again.
    assert wait_until(lambda: not backend_at(gateway.pool, failing).ejected)
    assert request("POST", gateway.url + "/v1/completions", completion(prompt)).status == 200
    assert engine.calls == 2


def test_dns_backend_re_resolution_adds_new_addresses_and_drains_vanished_ones(servers, background) -> None:
    port = servers[0].port
    name = f"dns:///weir-headless:{port}"
    answers = {"weir-headless": [f"127.0.0.1:{port}"]}

    async def resolver(host: str, resolved_port: int) -> list[str]:
        assert resolved_port == port
        return list(answers[host])

    pool = BackendPool(GatewayConfig(backends=(name,), resolve_interval_s=3600), resolver=resolver)

    async def scenario() -> None:
        await pool.start()
        assert await pool.wait_serving(20)
        first = pool.backends[0]
        assert [b.address for b in pool.backends] == [f"127.0.0.1:{port}"]

        answers["weir-headless"] = [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]
        await pool.resolve(name)
        second = backend_at(pool, f"127.0.0.2:{port}")
        assert await _until(lambda: second.available)

        # A call in flight on the first address when it leaves the DNS answer finishes there.
        generate = pb.GenerateRequest(
            model=TINY_MODEL, prompt="w w w", sampling_params=pb.SamplingParams(max_tokens=16)
        )
        with pool.lease(first):
            call = first.stub.Generate(generate)
            await call.read()
            answers["weir-headless"] = [f"127.0.0.2:{port}"]
            await pool.resolve(name)
            assert first.draining and first in pool.backends
            assert {pool.choose(TINY_MODEL, pb.MODEL_TASK_GENERATE).address for _ in range(4)} == {second.address}
            while await call.read() != grpc.aio.EOF:
                pass
            assert await call.code() == grpc.StatusCode.OK
        assert await _until(lambda: first not in pool.backends)  # retired once its last call ended
        assert [b.address for b in pool.backends] == [second.address]

    try:
        background.run(scenario(), timeout=60)
    finally:
        background.run(pool.close())


async def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_dns_backend_is_resolved_by_the_system_resolver(servers, make_gateway) -> None:
    port = servers[0].port
    gateway = make_gateway(GatewayConfig(backends=(f"dns:///localhost:{port}",)))
    assert f"127.0.0.1:{port}" in {b.address for b in gateway.pool.backends}
    assert request("POST", gateway.url + "/v1/completions", completion("w w w")).status == 200


class BusyControl(inference_pb2_grpc.ControlServiceServicer):
    """A server's ControlService reporting requests that other gateways sent it."""

    async def GetLoad(self, request, context):  # noqa: N802 - the gRPC method's name
        return pb.GetLoadResponse(models=[pb.ModelLoad(model=TINY_MODEL, running=3, waiting=2)])


def test_load_reported_by_a_server_steers_requests_away_from_it(servers, background, make_gateway) -> None:
    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        inference_pb2_grpc.add_ControlServiceServicer_to_server(BusyControl(), server)
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return server, port

    server, port = background.run(start())
    try:
        busy_address = f"127.0.0.1:{port}"
        config = GatewayConfig(backends=(servers[0].target, busy_address), routing="least-load", load_poll_s=0.05)
        gateway = make_gateway(config)
        busy = backend_at(gateway.pool, busy_address)
        assert wait_until(lambda: busy.reported_load == 5 and busy.available)
        idle = backend_at(gateway.pool, servers[0].target)
        assert wait_until(lambda: idle.reported_load == 0 and idle.available)
        chosen = {gateway.pool.choose(TINY_MODEL, pb.MODEL_TASK_GENERATE).address for _ in range(6)}
        assert chosen == {servers[0].target}
    finally:
        background.run(server.stop(None))
