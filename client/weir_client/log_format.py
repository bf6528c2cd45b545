"""Log lines for Weir's processes: text or one JSON object per line, each carrying the request id (and trace id)
of the call it belongs to. Shared by `weir serve` and `weir gateway` (which must not import each other); it needs
only the standard library."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

# Set per call (the server's RPC interceptor, the gateway's access middleware); asyncio copies it into the tasks a
# call starts, so every line of the call carries it.
request_id_var: ContextVar[str | None] = ContextVar("weir_request_id", default=None)

_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_tag"}
MASK = "***"
# A secret this long or longer is also masked where a log line holds only its start (truncating libraries do that).
MIN_SECRET_PREFIX = 8
_BEARER = r"(?P<scheme>\bbearer\s+)[^\s'\",]+"  # any `Bearer <token>`, whichever key it is


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (from the context unless the call passed one in `extra`) and the text tag for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            request_id = request_id_var.get()
        record.__dict__.update(request_id=request_id, request_tag=f" [{request_id}]" if request_id else "")
        return True


class RedactSecrets(logging.Filter):
    """Masks secrets in every record: any `Bearer <token>`, and each of `secrets` (or its first
    MIN_SECRET_PREFIX characters and more, where a line was cut short) in the message, the traceback, the stack and
    the `extra` fields. Put it on the handler, so records of every logger (aiohttp's, grpc's) pass through it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        patterns = [_BEARER, *(_secret_pattern(s) for s in sorted(set(secrets), key=len, reverse=True) if s)]
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)

    def redact(self, text: str) -> str:
        return self._pattern.sub(lambda m: (m.group("scheme") or "") + MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave the record for the handler to report
            return True
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if (key not in _RECORD_FIELDS or key == "request_tag") and isinstance(value, str):
                record.__dict__[key] = self.redact(value)
        return True


def _secret_pattern(secret: str) -> str:
    """`secret`, or as much of its start as a line holds, but no less than MIN_SECRET_PREFIX characters."""
    head, tail = secret[:MIN_SECRET_PREFIX], secret[MIN_SECRET_PREFIX:]
    optional = ""
    for char in reversed(tail):
        optional = f"(?:{re.escape(char)}{optional})?"
    return re.escape(head) + optional


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
        if record.exc_text:  # the traceback as a filter left it (redacted)
            entry["exception"] = record.exc_text
        elif record.exc_info:
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


def configure_logging(level: str = "info", log_format: str = "text", secrets: Iterable[str] = ()) -> None:
    """Route every log record to stderr in `log_format` ("text" or "json") at `level`, with `secrets` (API keys)
    and any bearer token masked."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactSecrets(secrets))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
