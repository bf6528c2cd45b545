"""TLS and API-key options of a connection to a Weir server (used by the clients, the CLI and the gateway)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

AUTHORIZATION_KEY = "authorization"


@dataclass(frozen=True)
class TlsOptions:
    """How to verify the server and, for mutual TLS, who we are. All paths are PEM files."""

    ca_file: str | None = None  # None = the system's trusted roots
    cert_file: str | None = None  # client certificate, for servers that require one (mutual TLS)
    key_file: str | None = None
    server_name: str | None = None  # the name the server certificate must carry, when it differs from the target

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key: set both cert_file and key_file, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials for these options (files are read now)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def resolve_tls(tls: TlsOptions | bool | None) -> TlsOptions | None:
    """`True` = TLS verified against the system roots; False/None = plaintext."""
    if tls is True:
        return TlsOptions()
    return tls or None


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries an API key to a server started with `--api-key`."""
    if api_key is None:
        return ()
    if not api_key.strip() or any(c in api_key for c in "\r\n"):
        raise ValueError("api_key must be a non-empty single-line string")
    return ((AUTHORIZATION_KEY, f"Bearer {api_key.strip()}"),)


def with_auth(metadata: Sequence[tuple[str, str]], api_key: str | None) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the API key's authorization entry (replacing any given one)."""
    kept = tuple((k, v) for k, v in metadata if not (api_key and k.lower() == AUTHORIZATION_KEY))
    return kept + auth_metadata(api_key)


def channel_security(
    tls: TlsOptions | bool | None, credentials: grpc.ChannelCredentials | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """Channel credentials (None = plaintext) and the extra channel options of a `tls=` / `credentials=` pair."""
    options = resolve_tls(tls)
    if options is None:
        return credentials, []
    if credentials is not None:
        raise ValueError("pass tls= or credentials=, not both")
    return options.credentials(), options.channel_options()


def read_api_keys(path: str) -> tuple[str, ...]:
    """The keys of an API-key file (`--api-key-file`): one per line; blank lines and `#` comments are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            keys = tuple(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror}") from e
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return keys


def server_ssl_context(certfile: str, keyfile: str, ca_certs: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context from PEM files, checked now (missing files, a key that is not the certificate's);
    with `ca_certs` clients must present a certificate it signed. Serving HTTPS (the gateway) and `weir up`'s
    start-up check share it."""
    for what, path in (("certificate", certfile), ("key", keyfile), ("CA", ca_certs)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"the TLS {what} file {path} does not exist")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise ValueError(f"the TLS key {keyfile} is not the key of the certificate {certfile}") from e
        raise ValueError(f"cannot load the TLS certificate {certfile} with its key {keyfile}: {e.reason}") from e
    if ca_certs is not None:
        try:
            context.load_verify_locations(cafile=ca_certs)
        except ssl.SSLError as e:
            raise ValueError(f"cannot load the TLS CA {ca_certs}: {e.reason}") from e
        context.verify_mode = ssl.CERT_REQUIRED
    return context
