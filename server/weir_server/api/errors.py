"""Map Weir's exceptions to gRPC statuses with google.rpc details; the only place statuses are chosen."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from weir_server.errors import (
    EngineStepError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    QueueFullError,
    WeirError,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after"
# Messages may quote the request; clients drop trailers over 8 KiB (and grpc-message is percent-encoded), so
# a long quote would turn a clear status into RESOURCE_EXHAUSTED on the client.
MAX_MESSAGE_BYTES = 1024
MAX_DESCRIPTION_BYTES = 512


class UnimplementedError(WeirError):
    """The request asks for a feature this server does not offer yet."""


class DeadlineExceededError(WeirError):
    """The call's deadline passed before its work was done; the work stopped."""


class CallCancelledError(WeirError):
    """The caller went away before its work was done; the work stopped."""


class FailedPreconditionError(WeirError):
    """The server is not set up for the request (e.g. a LoRA call on a server started without --enable-lora)."""


class AdapterNotFoundError(NotFoundError):
    """The request names a LoRA adapter that is not loaded; `field` names where it was named."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class AlreadyExistsError(WeirError):
    """The request would create something (an adapter) under a name already taken; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def to_grpc_status(error: Exception) -> grpc.Status:
    """The gRPC status (code, message, rich details in trailing metadata) an exception is answered with."""
    details: list[Any] = []
    metadata: list[tuple[str, str]] = []
    if isinstance(error, InvalidRequestError):
        code, message = code_pb2.INVALID_ARGUMENT, str(error)
        details.append(_bad_request(error.field, error.description))
    elif isinstance(error, ModelNotFoundError):
        code, message = code_pb2.NOT_FOUND, str(error)
        details.append(_bad_request("model", message))
    elif isinstance(error, AdapterNotFoundError | AlreadyExistsError):
        code = code_pb2.NOT_FOUND if isinstance(error, NotFoundError) else code_pb2.ALREADY_EXISTS
        message = str(error)
        details.append(_bad_request(error.field, message))
    elif isinstance(error, NotFoundError):
        code, message = code_pb2.NOT_FOUND, str(error)
    elif isinstance(error, FailedPreconditionError):
        code, message = code_pb2.FAILED_PRECONDITION, str(error)
    elif isinstance(error, QueueFullError):
        code, message = code_pb2.RESOURCE_EXHAUSTED, str(error)
        seconds = max(error.retry_after_s, 0.0)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        metadata.append((RETRY_AFTER_KEY, str(max(1, math.ceil(seconds)))))
    elif isinstance(error, EngineUnavailableError):
        code, message = code_pb2.UNAVAILABLE, str(error)
    elif isinstance(error, UnimplementedError):
        code, message = code_pb2.UNIMPLEMENTED, str(error)
    elif isinstance(error, DeadlineExceededError):
        code, message = code_pb2.DEADLINE_EXCEEDED, str(error)
    elif isinstance(error, CallCancelledError):
        code, message = code_pb2.CANCELLED, str(error)
    elif isinstance(error, EngineStepError):
        code, message = code_pb2.INTERNAL, f"the engine failed while running this request: {error}"
    else:
        code, message = code_pb2.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
    status = status_pb2.Status(code=code, message=clip(message, MAX_MESSAGE_BYTES))
    for detail in details:
        status.details.add().Pack(detail)
    grpc_status = rpc_status.to_status(status)
    return _with_metadata(grpc_status, tuple(metadata))


def clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 (on a character boundary), marked when cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 16].decode(errors="ignore") + " ...(truncated)"


def _bad_request(field: str, description: str) -> error_details_pb2.BadRequest:
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=clip(field, MAX_DESCRIPTION_BYTES), description=clip(description, MAX_DESCRIPTION_BYTES)
    )
    return error_details_pb2.BadRequest(field_violations=[violation])


def _with_metadata(status: grpc.Status, extra: tuple[tuple[str, str], ...]) -> grpc.Status:
    if not extra:
        return status
    return type(status)(status.code, status.details, tuple(status.trailing_metadata) + extra)  # type: ignore[call-arg]


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def map_errors(handler: Handler) -> Handler:
    """Wrap an async servicer method: Weir errors become their status, anything else INTERNAL, logged once."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except WeirError as e:
            if isinstance(e, EngineStepError):
                logger.error("%s failed in the engine: %s", handler.__name__, e)
            status = to_grpc_status(e)
        except Exception as e:
            logger.exception("%s failed unexpectedly", handler.__name__)
            status = to_grpc_status(e)
        await context.abort(status.code, status.details, status.trailing_metadata)

    return wrapper  # type: ignore[return-value]
