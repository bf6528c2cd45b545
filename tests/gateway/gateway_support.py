"""Helpers for gateway tests: serving a gateway app on a loopback port, plain HTTP requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from weir_gateway.app import create_app
from weir_gateway.backends import BackendPool
from weir_gateway.config import GatewayConfig
from weir_gateway.http_limits import server_options
from weir_gateway.state import POOL


@dataclass
class RunningGateway:
    """A gateway app served on a loopback port."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def pool(self) -> BackendPool:
        return self.app[POOL]


async def start_gateway(config: GatewayConfig, wait_serving: bool = True) -> RunningGateway:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, **server_options(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    gateway = RunningGateway(f"http://{host}:{port}", app, runner)
    if wait_serving:
        assert await gateway.pool.wait_serving(10), "no backend became SERVING"
    return gateway


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | dict[str, Any] | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> HttpReply:  # fmt: skip
    """A plain HTTP request that returns error statuses instead of raising."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return HttpReply(reply.status, dict(reply.headers), reply.read())
    except urllib.error.HTTPError as e:
        return HttpReply(e.code, dict(e.headers), e.read())
