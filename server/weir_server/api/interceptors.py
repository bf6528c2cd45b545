"""Helpers for server interceptors: answer a call with a status instead of running it, or run code around it."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def method_service(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").partition("/")[0]


def metadata_value(metadata: Any, key: str) -> str | None:
    """The first value of `key` in invocation metadata (as a str), or None."""
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def _rebuild(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    factory, _ = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers every call with `code` and runs nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return _rebuild(handler, refuse)


def around(
    handler: grpc.RpcMethodHandler, enter: Callable[[], None], leave: Callable[[], None]
) -> grpc.RpcMethodHandler:
    """A handler that calls `enter()` before the behavior runs and `leave()` after it ends, however it ends."""
    _, attribute = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attribute)
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            enter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                leave()

        return _rebuild(handler, stream)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        enter()
        try:
            return await behavior(request, context)
        finally:
            leave()

    return _rebuild(handler, call)
