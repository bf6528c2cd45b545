"""The gateway's frozen configuration, built once from the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from weir_client.security import TlsOptions
from weir_gateway.resolver import dns_target
from weir_gateway.routing import ROUTING_POLICIES

DEFAULT_BACKEND = "127.0.0.1:50051"


@dataclass(frozen=True)
class SslConfig:
    """HTTPS on the gateway's port: PEM files; with `ca_certs` clients must present a certificate it signed."""

    certfile: str
    keyfile: str
    ca_certs: str | None = None  # set = mutual TLS


@dataclass(frozen=True)
class GatewayConfig:
    """Where to listen, which Weir servers to use, and the limits put on each request."""

    host: str = "127.0.0.1"
    port: int = 8000
    backends: tuple[str, ...] = (DEFAULT_BACKEND,)  # HOST:PORT of each Weir gRPC server
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # bearer keys; empty = no auth
    ssl: SslConfig | None = None  # None = plain HTTP
    cors_origins: tuple[str, ...] = ()  # allowed Origins ("*" for any); empty = CORS off
    max_body_bytes: int = 8 * 1024 * 1024
    # A connection must send a whole request head within this long of opening or of its previous answer (a head
    # sent slowly is cut off); an idle keep-alive connection is closed after it too.
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0  # the whole body must arrive within this long of its head, else 408
    max_header_bytes: int = 8190  # the request line, and each header (name and value together); else 400
    max_headers: int = 128  # headers in one request; else 400
    max_n: int = 16  # most choices per prompt
    max_tokens: int = 32768  # most tokens a request may ask for per choice
    max_prompts: int = 256  # most prompts in one completions request
    max_embedding_inputs: int = 2048
    request_timeout_s: float = 600.0  # the gRPC deadline of every backend call
    health_retry_s: float = 1.0  # pause before re-watching a backend whose health stream broke
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message size limit, both ways
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running requests may finish
    backend_tls: TlsOptions | None = None  # None = plaintext gRPC to the backends
    # Sent as `authorization: Bearer KEY` to backends run with --api-key. Keys stay out of the repr (and logs).
    backend_api_key: str | None = field(default=None, repr=False)
    strict: bool = False  # refuse (400) the OpenAI fields the gateway accepts and ignores, and unknown fields
    response_store_size: int = 1024  # most stored /v1/responses objects (per gateway process); 0 stores none
    response_store_ttl_s: float = 3600.0  # how long a stored response can be read or continued
    metrics_require_api_key: bool = False  # GET /metrics needs one of `api_keys` too; False = open to scrapers
    routing: str = "cache-aware"  # cache-aware, least-load or round-robin; see docs/routing.md
    routing_imbalance: float = 2.0  # cache-aware leaves a prefix's home once it has more than this x the least-
    routing_imbalance_requests: int = 4  # loaded backend's requests in flight, plus this many
    routing_prefix_bytes: int = 1024  # how much of a prompt's head the cache-aware key covers
    max_attempts: int = 3  # tries of a request that fails before any output with UNAVAILABLE / RESOURCE_EXHAUSTED
    retry_backoff_s: float = 0.05  # the first retry waits up to this long (full jitter), doubling per retry
    eject_after: int = 5  # consecutive UNAVAILABLE calls that eject a backend (0 = never eject)
    eject_s: float = 10.0  # how long an ejected backend gets no requests before a health probe may bring it back
    resolve_interval_s: float = 30.0  # how often dns:/// backends are resolved again
    load_poll_s: float = 1.0  # how often each backend's GetLoad is read (0 = never: the gateway's own counts only)
    rate_limit_rpm: int = 0  # requests per minute per API key (0 = no limit)
    rate_limit_tpm: int = 0  # prompt + completion tokens per minute per API key (0 = no limit)

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("at least one backend is required")
        if self.metrics_require_api_key and not self.api_keys:
            raise ValueError("--metrics-require-api-key needs an API key (--api-key or --api-key-file)")
        limits = (
            "max_body_bytes",
            "max_header_bytes",
            "max_headers",
            "max_n",
            "max_tokens",
            "max_prompts",
            "max_embedding_inputs",
        )
        for name in limits:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        if self.response_store_size < 0:
            raise ValueError("response_store_size must be >= 0")
        if self.response_store_ttl_s <= 0:
            raise ValueError("response_store_ttl_s must be positive")
        self._check_scale_out()

    def _check_scale_out(self) -> None:
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}")
        if self.routing_imbalance < 1:
            raise ValueError("routing_imbalance must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for name in ("routing_imbalance_requests", "eject_after", "rate_limit_rpm", "rate_limit_tpm", "load_poll_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.routing_prefix_bytes < 1:
            raise ValueError("routing_prefix_bytes must be at least 1")
        for name in ("retry_backoff_s", "eject_s", "resolve_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for address in self.backends:
            dns_target(address)  # a dns:/// backend without a port fails here, before anything starts
