"""The gateway's security: HTTPS towards its clients, and its API key towards its backends (added to every gRPC
call by a channel interceptor)."""

from __future__ import annotations

import ssl
from typing import Any

import grpc

from weir_client.security import auth_metadata, server_ssl_context
from weir_gateway.config import SslConfig


def https_context(config: SslConfig | None) -> ssl.SSLContext | None:
    """The TLS context of the gateway's port (files read and checked now); None = plain HTTP."""
    if config is None:
        return None
    return server_ssl_context(config.certfile, config.keyfile, config.ca_certs)


class _AuthMetadata:
    """Adds `authorization: Bearer KEY` to the metadata of each call."""

    def __init__(self, api_key: str) -> None:
        self._entries = auth_metadata(api_key)

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._entries)
        return details._replace(metadata=metadata)


# grpc.aio files each interceptor under the first call shape it implements, so each shape needs its own object.
class _UnaryUnary(_AuthMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_AuthMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_AuthMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AuthMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def auth_interceptors(api_key: str | None) -> list[grpc.aio.ClientInterceptor] | None:
    """Channel interceptors that carry `api_key`; None when there is no key."""
    if not api_key:
        return None
    return [kind(api_key) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
