"""Log lines for Weir's processes: text or one JSON object per line, each carrying the request id (and trace id)
of the call it belongs to. Shared by `weir serve` and `weir gateway` (which must not import each other); it needs
only the standard library."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

# Set per call (the server's RPC interceptor, the gateway's access middleware); asyncio copies it into the tasks a
# call starts, so every line of the call carries it.
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
