"""Log set-up for `weir serve`: the shared formats of weir_client.log_format (the request id comes from the RPC
interceptor through `request_id_var`)."""

from __future__ import annotations

from weir_client.log_format import (
    LOG_FORMATS,
    TEXT_FORMAT,
    JsonFormatter,
    RequestIdFilter,
    configure_logging,
    request_id_var,
    trace_ids,
)

__all__ = [
    "LOG_FORMATS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "RequestIdFilter",
    "configure_logging",
    "request_id_var",
    "trace_ids",
]
