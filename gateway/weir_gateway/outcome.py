"""The status a client got for a request, worked out in one place for the middlewares that record it (the access
log, the metrics and the request's span)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

CLIENT_CLOSED = 499  # the client went away before its answer (nginx's convention)


async def handle_and_record(
    request: web.Request, handler: Handler, record: Callable[[int], None]
) -> web.StreamResponse:
    """Run `handler`, then call `record` with the status the client got: the response's, an HTTP error's, 499 when
    the handler was cancelled (the client went away) and 500 for any other failure."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        record(status)
