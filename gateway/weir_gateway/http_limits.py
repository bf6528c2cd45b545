"""What a client may cost the gateway's HTTP server before a handler runs: how long its request head and body may
take, and how large the head may be. A request aiohttp's parser refuses is logged without the refused line,
which may hold an API key."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from weir_gateway.config import GatewayConfig
from weir_gateway.errors import ApiError
from weir_gateway.state import CONFIG

_TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's message (it names no value)


def server_options(config: GatewayConfig) -> dict[str, Any]:
    """`web.AppRunner` keywords that put `config`'s limits on every connection."""
    return {
        "handler_cancellation": True,  # a client that disconnects cancels its backend calls at once
        # aiohttp's keep-alive timer runs from a connection's opening, and from each answer, until the next request
        # head is complete: it cuts off a head sent slowly (slowloris) as well as an idle connection.
        "keepalive_timeout": config.header_timeout_s,
        "max_line_size": config.max_header_bytes,  # the request line
        "max_field_size": config.max_header_bytes,  # each header, name and value together
        "max_headers": config.max_headers,
        "logger": ParserErrorLog(logging.getLogger("aiohttp.server"), config),
    }


async def read_body(request: web.Request) -> bytes:
    """The whole request body, which must arrive within the configured body timeout (a 408 otherwise); aiohttp
    answers 413 past the body size limit."""
    timeout = request.app[CONFIG].body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g}s", code="body_timeout") from None


class ParserErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, except that a request its parser refuses (a header or request line over the limit,
    too many headers, a malformed head) is one INFO line saying which limit, without the exception: its message
    quotes the first 100 bytes of the offending line, an `Authorization: Bearer` key included."""

    def __init__(self, logger: logging.Logger, config: GatewayConfig) -> None:
        super().__init__(logger)
        self.config = config

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, HttpProcessingError):
            remote = args[0] if args else "?"
            super().log(min(level, logging.INFO), "refused a request from %s: %s", remote, self.describe(error))
            return
        super().log(level, msg, *args, **kwargs)

    def describe(self, error: HttpProcessingError) -> str:
        """What was wrong, in words that quote nothing the client sent."""
        if isinstance(error, LineTooLong):
            return f"a header or the request line is over {self.config.max_header_bytes} bytes (--max-header-bytes)"
        if error.message == _TOO_MANY_HEADERS:
            return f"more than {self.config.max_headers} headers (--max-headers)"
        return f"malformed HTTP ({type(error).__name__}, status {error.code})"
