"""End-to-end fixtures: the real gateway in front of the session's real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def gateway_url(weir_server: Any) -> Iterator[str]:
    """The base URL (".../v1") of a real gateway, on the server's own loop, over the session's server."""
    from aiohttp import web

    from weir_gateway.app import create_app
    from weir_gateway.config import GatewayConfig

    async def start() -> web.AppRunner:
        runner = web.AppRunner(create_app(GatewayConfig(backends=(weir_server.target,))), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = weir_server.run(start())
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/v1"
    weir_server.run(runner.cleanup())
