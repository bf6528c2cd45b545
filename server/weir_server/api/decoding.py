"""Requests that do not decode (bad protobuf, invalid UTF-8 in a string field) answered INVALID_ARGUMENT with the
reason, instead of grpc's UNKNOWN "Unexpected DecodeError".

grpc.aio calls a handler's request deserializer itself, outside any servicer code, so the error is caught there:
the wrapped deserializer returns an `Undecodable` in place of the message, and the wrapped behavior answers it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from weir_server.api.errors import MAX_MESSAGE_BYTES, clip

if TYPE_CHECKING:  # generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


@dataclass(frozen=True)
class Undecodable:
    """What a request that failed to decode is replaced with: why it failed."""

    reason: str


def decoding(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer`, returning an Undecodable instead of raising for bytes that are not its message."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "request message")

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except (DecodeError, UnicodeDecodeError) as e:
            # upb names the cause: "String field had bad UTF-8", "Wire format was corrupt"...
            return Undecodable(f"the request does not decode as {name}: {e}")

    return decode


async def _refuse(undecodable: Undecodable, context: Context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, clip(undecodable.reason, MAX_MESSAGE_BYTES))


def _checked_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async def checked() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await _refuse(request, context)
            yield request

    return checked()


def answering_decode_errors(handler: Handler) -> Handler:
    """A handler of the same shape whose requests that fail to decode are answered INVALID_ARGUMENT."""
    if handler.request_deserializer is None:
        return handler
    factory, attribute = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attribute)
    streaming_in = handler.request_streaming

    async def check(request: Any, context: Context) -> Any:
        if streaming_in:
            return _checked_stream(request, context)
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        return request

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behavior(await check(request, context), context):
                yield response

        wrapped: Callable[..., Any] = stream
    else:

        async def call(request: Any, context: Context) -> Any:
            return await behavior(await check(request, context), context)

        wrapped = call
    return factory(
        wrapped,
        request_deserializer=decoding(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Answers requests that do not decode INVALID_ARGUMENT with the reason (every service on the port)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        # The registered handlers are fixed objects, so each is wrapped once rather than on every call.
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, answering_decode_errors(handler))
            self._wrapped[details.method] = cached
        return cached[1]
