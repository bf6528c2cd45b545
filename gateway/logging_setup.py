"""Log set-up for `weir gateway`: text or one JSON object per line, each carrying the request id (and trace id)
of the request it belongs to, and one access line per HTTP request. Twin of weir_server.logging_setup (the
gateway never imports the server package)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
CLIENT_CLOSED = 499  # the status access logs use for a client that went away before the answer

access_logger = logging.getLogger("weir_gateway.access")

# Set by the access-log middleware; asyncio copies it into the tasks a request starts, so all its lines carry it.
request_id_var: ContextVar[str | None] = ContextVar("weir_request_id", default=None)

_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_tag"}


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (from the context unless the call passed one in `extra`) and the text tag for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        record.request_tag = f" [{record.request_id}]" if record.request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request and trace ids, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(trace_ids())
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def trace_ids() -> dict[str, str]:
    """The active span's trace and span ids, when tracing is loaded and a span is recording."""
    trace = sys.modules.get("opentelemetry.trace")  # never import it just to log
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """Route every log record to stderr in `log_format` ("text" or "json") at `level`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
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
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            access_logger.info(
                '%s "%s %s" %d %.1fms', request.remote, request.method, request.path_qs, status, duration_ms,
                extra={"request_id": request_id, "method": request.method, "path": request.path, "status": status,
                       "duration_ms": duration_ms, "remote": request.remote,
                       "user_agent": request.headers.get("User-Agent")},
            )  # fmt: skip

    return access_log
