"""The one exception type the client raises: a gRPC status with its rich details unpacked."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"
_RETRY_AFTER_KEY = "retry-after"

logger = logging.getLogger(__name__)


class WeirClientError(Exception):
    """A failed call. `code` is the gRPC status code, `field` the request field at fault (when known),
    `retry_after` the server's hint in seconds for RESOURCE_EXHAUSTED."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def invalid_argument(cls, field: str, message: str) -> WeirClientError:
        """An error found before sending, shaped like the server's."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field=field)


def error_from_rpc(error: grpc.RpcError) -> WeirClientError:
    """Convert a sync or asyncio gRPC error, reading the google.rpc.Status details in its trailers."""
    call: Any = error
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message = (call.details() if hasattr(call, "details") else None) or str(error)
    metadata = (call.trailing_metadata() if hasattr(call, "trailing_metadata") else None) or ()
    field, retry_after = status_details(metadata)
    return WeirClientError(code, message, field=field, retry_after=retry_after)


def status_details(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str | None, float | None]:
    """The request field at fault and the retry delay (seconds) in a failed call's trailing metadata: the rich
    google.rpc.Status (BadRequest, RetryInfo) and a plain `retry-after` entry. Also used by the gateway."""
    field: str | None = None
    retry_after: float | None = None
    for key, value in metadata:
        if key == _RETRY_AFTER_KEY:
            retry_after = _float_or_none(value)
        elif key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:  # a malformed trailer must not hide the real error
                logger.warning("unparseable %s in a failed call's trailers", _DETAILS_KEY)
                continue
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    if bad_request.field_violations:
                        field = bad_request.field_violations[0].field
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    retry_after = info.retry_delay.ToTimedelta().total_seconds()
    return field, retry_after


def _float_or_none(value: str | bytes) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None
