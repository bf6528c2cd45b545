"""How server/api/errors.py answers each exception (a unit test: no server, no model)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from weir_server.api.errors import UnimplementedError, map_errors, to_grpc_status
from weir_server.errors import (
    EngineStepError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
)


def _details(status: grpc.Status) -> status_pb2.Status:
    value = dict(status.trailing_metadata)["grpc-status-details-bin"]
    return status_pb2.Status.FromString(value)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("sampling_params.top_p", "must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFoundError("model 'x' is not loaded"), grpc.StatusCode.NOT_FOUND),
        (QueueFullError("queue full", retry_after_s=2.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineUnavailableError("loading"), grpc.StatusCode.UNAVAILABLE),
        (UnimplementedError("no grammars yet"), grpc.StatusCode.UNIMPLEMENTED),
        (EngineStepError("CUDA out of memory"), grpc.StatusCode.INTERNAL),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_maps_to_its_status_code(error: Exception, code: grpc.StatusCode) -> None:
    status = to_grpc_status(error)
    assert status.code == code
    assert _details(status).message == status.details


def test_invalid_request_carries_a_field_violation() -> None:
    status = to_grpc_status(InvalidRequestError("sampling_params.top_p", "must be in (0, 1]"))
    bad_request = error_details_pb2.BadRequest()
    assert _details(status).details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "sampling_params.top_p"
    assert bad_request.field_violations[0].description == "must be in (0, 1]"
    assert status.details == "sampling_params.top_p: must be in (0, 1]"


def test_queue_full_carries_retry_after_metadata_and_retry_info() -> None:
    status = to_grpc_status(QueueFullError("queue full", retry_after_s=2.5))
    assert dict(status.trailing_metadata)["retry-after"] == "3"
    info = error_details_pb2.RetryInfo()
    assert _details(status).details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 2500


def test_unexpected_errors_do_not_leak_their_message() -> None:
    status = to_grpc_status(RuntimeError("secret path /etc/x"))
    assert "secret" not in status.details and "RuntimeError" in status.details


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, ...] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, metadata: Any) -> None:
        self.aborted = (code, details, metadata)
        raise grpc.aio.AbortError()


async def test_map_errors_aborts_with_the_status_and_logs_unexpected_errors_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Servicer:
        @map_errors
        async def Broken(self, request: Any, context: Any) -> None:
            raise KeyError("oops")

    context = _Context()
    with pytest.raises(grpc.aio.AbortError):
        await Servicer().Broken(None, context)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INTERNAL
    records = [r for r in caplog.records if "Broken failed unexpectedly" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None
