"""What handlers find on the app and the request: the config, the backend pool, the request id."""

from __future__ import annotations

import functools
import math
from importlib import metadata
from typing import Any

from aiohttp import web

from weir_gateway.backends import BackendPool
from weir_gateway.config import GatewayConfig
from weir_gateway.errors import bad_request
from weir_gateway.generation import CallContext

CONFIG = web.AppKey("config", GatewayConfig)
POOL = web.AppKey("pool", BackendPool)
# Request-scoped key set by the request-id middleware (typed keys arrived in aiohttp 3.13).
REQUEST_ID: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "weir_request_id"
TIMEOUT_HEADER = "X-Request-Timeout"  # optional per-request deadline in seconds, capped by the config


@functools.cache  # reading package metadata parses a file: once per process, not per request
def gateway_version() -> str:
    try:
        return metadata.version("weir-gateway")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def fingerprint() -> str:
    """The `system_fingerprint` of every response: which gateway build answered."""
    return f"weir-{gateway_version()}"


def call_context(request: web.Request) -> CallContext:
    """The request id and deadline every backend call of this request carries."""
    timeout = request.app[CONFIG].request_timeout_s
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            raise bad_request(TIMEOUT_HEADER, f"{TIMEOUT_HEADER} must be a number of seconds") from None
        if not (math.isfinite(asked) and asked > 0):
            raise bad_request(TIMEOUT_HEADER, f"{TIMEOUT_HEADER} must be a positive number of seconds")
        timeout = min(timeout, asked)
    return CallContext(request[REQUEST_ID], timeout)
