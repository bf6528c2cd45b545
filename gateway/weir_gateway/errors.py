"""OpenAI-shaped errors and the one table that maps gRPC status codes to HTTP statuses."""

from __future__ import annotations

from typing import Any

import grpc

from weir_client.errors import status_details

# gRPC status -> (HTTP status, OpenAI error type). The only place this mapping lives.
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.OK: (200, "ok"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    # The gateway's own cancels never reach a client, so a CANCELLED that does means the backend dropped the call.
    grpc.StatusCode.CANCELLED: (503, "service_unavailable"),
    grpc.StatusCode.UNKNOWN: (500, "server_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.DATA_LOSS: (500, "server_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}

# HTTP status -> OpenAI error type, for errors the gateway raises itself.
_TYPE_OF_STATUS = {status: kind for status, kind in GRPC_TO_HTTP.values()} | {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
}


class ApiError(Exception):
    """An error answered to the client as OpenAI error JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return _TYPE_OF_STATUS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str) -> ApiError:
    """A 400 naming the offending request field."""
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def no_backend(message: str = "no Weir backend is serving") -> ApiError:
    """A 503: the gateway has nowhere to send the request."""
    return ApiError(503, message, code="backend_unavailable")


# Routes whose body fields reach the server under other names: the server's field -> the body's. Tokenize and
# Detokenize send the one body value as a list of one, so the server's index is dropped there.
_BODY_FIELD_OF_ROUTE: dict[str, dict[str, str]] = {
    "/v1/embeddings": {"texts": "input", "token_ids": "input"},
    "/tokenize": {"texts": "prompt"},
    "/detokenize": {"sequences": "tokens"},
}
_ONE_VALUE_ROUTES = frozenset({"/tokenize", "/detokenize"})


def from_rpc_error(error: grpc.aio.AioRpcError, path: str | None = None) -> ApiError:
    """Convert a failed gRPC call into the ApiError the client sees, keeping field names and retry hints; with the
    route's `path`, a field is named as that route's body names it."""
    status, _ = GRPC_TO_HTTP.get(error.code(), (500, "server_error"))
    message = error.details() or error.code().name.lower()
    param, retry_after = status_details(error.trailing_metadata() or ())
    if param is None and error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        param = _param_from_message(message)
    code = None
    if status == 404 and "model" in message.lower():
        code = "model_not_found"
    elif status == 503:
        code = "backend_unavailable"
    openai_param = _openai_param(param, path)
    if param and openai_param != param and message.startswith(f"{param}:"):
        message = f"{openai_param}{message[len(param) :]}"  # name the body's field, as the param does
    return ApiError(status, message, param=openai_param, code=code, retry_after_s=retry_after)


def _param_from_message(message: str) -> str | None:
    """Servers write invalid-argument details as 'field.path: reason'; take the field when it looks like one."""
    head, sep, _ = message.partition(":")
    if sep and head and all(part.isidentifier() for part in head.replace("[", ".").replace("]", "").split(".")):
        return head
    return None


def _openai_param(param: str | None, path: str | None = None) -> str | None:
    """Server field paths (sampling_params.top_p, texts[2]) become the request body's field (top_p, input[2])."""
    if param is None:
        return None
    head, bracket, index = param.partition("[")
    renamed = _BODY_FIELD_OF_ROUTE.get(path or "", {}).get(head)
    if renamed is not None:
        return renamed if path in _ONE_VALUE_ROUTES else f"{renamed}{bracket}{index}"
    for prefix in ("sampling_params.", "request."):
        if param.startswith(prefix):
            return param[len(prefix) :]
    return param
