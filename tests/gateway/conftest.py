"""Gateway fixtures: fake backends and gateways on a background event loop, reachable from sync and async tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from gateway_fakes import BackgroundLoop, FakeServer
from gateway_support import RunningGateway, start_gateway

from weir_gateway.config import GatewayConfig


@pytest.fixture(scope="session")
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def fake(background: BackgroundLoop) -> Iterator[FakeServer]:
    server = background.run(FakeServer().start())
    yield server
    background.run(server.stop())


@pytest.fixture(scope="session")
def gateway(background: BackgroundLoop, fake: FakeServer) -> Iterator[RunningGateway]:
    """One gateway over the session's fake backend."""
    running = background.run(start_gateway(GatewayConfig(backends=(fake.address,), max_n=4, max_tokens=64)))
    yield running
    background.run(running.runner.cleanup())


@pytest.fixture
def make_gateway(background: BackgroundLoop) -> Iterator[Callable[..., RunningGateway]]:
    """Start extra gateways with their own config; they are stopped after the test."""
    started: list[RunningGateway] = []

    def make(config: GatewayConfig, wait_serving: bool = True) -> RunningGateway:
        running = background.run(start_gateway(config, wait_serving))
        started.append(running)
        return running

    yield make
    for running in started:
        background.run(running.runner.cleanup())


@pytest.fixture
def make_fake(background: BackgroundLoop) -> Iterator[Callable[[], FakeServer]]:
    """Start fresh fake backends (clean counters); stopped after the test."""
    started: list[FakeServer] = []

    def make() -> FakeServer:
        server = background.run(FakeServer().start())
        started.append(server)
        return server

    yield make
    for server in started:
        background.run(server.stop())
