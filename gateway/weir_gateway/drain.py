"""Running the gateway with a graceful drain: on SIGTERM/SIGINT stop listening, refuse new requests (503), let
running ones (streams included) finish for up to `drain_timeout_s`, then close the backend channels."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from weir_gateway.config import GatewayConfig
from weir_gateway.errors import ApiError
from weir_gateway.http_limits import server_options

logger = logging.getLogger(__name__)


@dataclass
class DrainState:
    """Requests in flight, and whether the gateway is draining."""

    draining: bool = False
    in_flight: int = 0
    refused: int = 0


DRAIN = web.AppKey("drain", DrainState)


def install_drain(app: web.Application) -> None:
    """Give `app` its drain state (create_app calls this; `drain_middleware` reads it)."""
    app[DRAIN] = DrainState()


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count running requests; while draining answer 503 (health included, so balancers move away)."""
    state = request.app[DRAIN]
    if state.draining:
        state.refused += 1
        error = ApiError(503, "the gateway is shutting down; retry on another instance", code="shutting_down")
        response = web.json_response(error.body(), status=error.status)
        response.force_close()  # a keep-alive client must reconnect, which reaches another instance
        return response
    state.in_flight += 1
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1


async def serve(app: web.Application, config: GatewayConfig, ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve `app` (HTTPS with `ssl_context`) until SIGTERM or SIGINT, then drain and stop."""
    runner = web.AppRunner(app, shutdown_timeout=config.drain_timeout_s, **server_options(config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        state = app[DRAIN]
        state.draining = True
        logger.info("draining: %d requests running, waiting up to %.0fs", state.in_flight, config.drain_timeout_s)
    finally:
        await runner.cleanup()  # stops listening, waits for running handlers, then closes the backend pool
    logger.info("stopped (%d requests refused while draining)", app[DRAIN].refused)


def run_app(app: web.Application, config: GatewayConfig, ssl_context: ssl.SSLContext | None = None) -> None:
    """Blocking entry point of `weir gateway`."""
    asyncio.run(serve(app, config, ssl_context))
