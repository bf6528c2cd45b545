"""TLS credentials for the gRPC port and the API-key check on InferenceService calls."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from weir_server.api.interceptors import metadata_value, method_service, refusal
from weir_server.config import TlsConfig

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
# Probes and tooling must reach these without a key: load balancers check health, grpcurl lists services.
OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"cannot read the TLS {what} {path!r}: {e.strerror or e}") from e


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials from PEM files; with a client CA, clients without a certificate it signed are refused."""
    key, cert = _read(tls.key_file, "key"), _read(tls.cert_file, "certificate")
    client_ca = _read(tls.client_ca_file, "client CA") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """Whether `token` is one of `keys`, compared in constant time against every key."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    return matched


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer TOKEN` value."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to calls without a valid bearer key; health and reflection stay open."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        if not keys or not all(keys):
            raise ValueError("API keys must be non-empty strings")
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or method_service(details.method) in OPEN_SERVICES:
            return handler
        token = bearer_token(metadata_value(details.invocation_metadata, AUTHORIZATION_KEY))
        if token is not None and key_matches(token, self._keys):
            return handler
        # The key itself is never logged, only that one was missing or wrong.
        logger.info("refused %s: %s API key", details.method, "missing" if token is None else "invalid")
        message = "missing or invalid API key; send `authorization: Bearer <key>` metadata"
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, message)
