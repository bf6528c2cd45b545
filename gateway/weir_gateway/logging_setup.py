"""Log set-up for `weir gateway`: the shared formats of weir_client.log_format, and one access line per HTTP
request carrying its request id."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from weir_client import log_format as shared
from weir_client.log_format import LOG_FORMATS, JsonFormatter, RequestIdFilter, request_id_var
from weir_gateway.outcome import handle_and_record

__all__ = ["LOG_FORMATS", "JsonFormatter", "RequestIdFilter", "access_log_middleware", "configure_logging",
           "request_id_var"]  # fmt: skip

access_logger = logging.getLogger("weir_gateway.access")


def configure_logging(level: str = "info", log_format: str = "text", secrets: Iterable[str] = ()) -> None:
    """Route every log record to stderr in `log_format` ("text" or "json") at `level`, `secrets` (the API keys)
    masked."""
    shared.configure_logging(level, log_format, secrets)
    # Our access line (with request id, route and duration) replaces aiohttp's.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def access_log_middleware(request_id_key: Any) -> Middleware:
    """A middleware putting the request id (found at `request[request_id_key]`) on every log line of the request
    and writing one `weir_gateway.access` line when it ends; place it right after the request-id middleware."""

    @web.middleware
    async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.get(request_id_key)
        request_id_var.set(request_id)
        started = time.perf_counter()

        def record(status: int) -> None:
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            access_logger.info(
                '%s "%s %s" %d %.1fms', request.remote, request.method, request.path_qs, status, duration_ms,
                extra={"request_id": request_id, "method": request.method, "path": request.path, "status": status,
                       "duration_ms": duration_ms, "remote": request.remote,
                       "user_agent": request.headers.get("User-Agent")},
            )  # fmt: skip

        return await handle_and_record(request, handler, record)

    return access_log
