"""`weir gateway`: parse arguments into a GatewayConfig and serve the OpenAI API until interrupted."""

from __future__ import annotations

import argparse
import logging
import os

from weir_client.security import TlsOptions, read_api_keys
from weir_gateway.app import create_app
from weir_gateway.config import DEFAULT_BACKEND, GatewayConfig, SslConfig
from weir_gateway.drain import run_app
from weir_gateway.logging_setup import LOG_FORMATS, configure_logging
from weir_gateway.routing import ROUTING_POLICIES
from weir_gateway.security import https_context
from weir_gateway.telemetry import create_tracer_provider

logger = logging.getLogger("weir_gateway")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The gateway's arguments (on `parser` when a caller embeds them in its own command)."""
    defaults = GatewayConfig()
    p = parser or argparse.ArgumentParser(prog="weir gateway", description="OpenAI-compatible HTTP API over Weir")
    p.add_argument(
        "--backend",
        action="append",
        metavar="HOST:PORT",
        help=f"a Weir gRPC server; repeat for several (default {DEFAULT_BACKEND})",
    )
    p.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=defaults.port, help="port to listen on (default %(default)s)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require `Authorization: Bearer KEY`; repeat for several keys",
    )
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="read API keys from a file, one per line, blank lines and # comments skipped (keeps them out of `ps`)",
    )
    p.add_argument("--ssl-certfile", "--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--ssl-keyfile", "--tls-key", metavar="PEM", help="the private key of --ssl-certfile")
    p.add_argument(
        "--ssl-ca-certs",
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from ORIGIN ('*' for any); CORS is off by default",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="largest request body; larger is a 413 (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout_s,
        metavar="SECONDS",
        help="a connection must send a whole request head within this long of opening or of its previous "
        "answer, else it is closed (slow heads, idle keep-alive); behind a load balancer that reuses "
        "connections set it above the balancer's idle timeout (default %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout_s,
        metavar="SECONDS",
        help="the whole request body must arrive within this long of its head, else 408 (default %(default)s)",
    )
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=defaults.max_header_bytes,
        help="longest request line, and longest header (name and value together); longer is a 400 "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-headers",
        type=int,
        default=defaults.max_headers,
        help="most headers in one request; more is a 400 (default %(default)s)",
    )
    p.add_argument("--max-n", type=int, default=defaults.max_n, help="most choices per prompt")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="most tokens per choice")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout_s,
        help="seconds before a backend call is abandoned (its gRPC deadline)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=defaults.drain_timeout_s,
        help="seconds running requests may finish after SIGTERM (default %(default)s)",
    )
    p.add_argument("--backend-tls", action="store_true", help="connect to the backends over TLS (system roots)")
    p.add_argument("--backend-tls-ca", metavar="PEM", help="TLS: verify backends against this CA instead")
    p.add_argument("--backend-tls-cert", metavar="PEM", help="mutual TLS: the gateway's client certificate")
    p.add_argument("--backend-tls-key", metavar="PEM", help="mutual TLS: the key of --backend-tls-cert")
    p.add_argument(
        "--backend-tls-server-name", metavar="NAME", help="TLS: the name the backend certificates must carry"
    )
    p.add_argument(
        "--backend-api-key",
        metavar="KEY",
        help="API key of backends run with --api-key (default: $WEIR_BACKEND_API_KEY)",
    )
    p.add_argument(
        "--response-store-size",
        type=int,
        default=defaults.response_store_size,
        help="most /v1/responses objects kept for GET and previous_response_id, per gateway process "
        "(0 keeps none; default %(default)s)",
    )
    p.add_argument(
        "--response-store-ttl",
        type=float,
        default=defaults.response_store_ttl_s,
        help="seconds a stored response stays readable (default %(default)s)",
    )
    p.add_argument(
        "--metrics-require-api-key",
        action="store_true",
        help="GET /metrics needs `Authorization: Bearer KEY` for an --api-key too (default: open to scrapers)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse (400) request fields the gateway would accept and ignore (store, metadata, user, "
        "service_tier, ...) and unknown fields; see docs/openai.md",
    )
    p.add_argument(
        "--routing",
        default=defaults.routing,
        choices=ROUTING_POLICIES,
        help="how requests pick a backend: cache-aware (a prompt prefix's home backend, least-load when it is busy), "
        "least-load (fewest requests in flight) or round-robin; see docs/routing.md (default %(default)s)",
    )
    p.add_argument(
        "--routing-imbalance",
        type=float,
        default=defaults.routing_imbalance,
        metavar="FACTOR",
        help="cache-aware: leave a prefix's home once it has more than FACTOR x the least-loaded backend's "
        "requests in flight plus --routing-imbalance-requests (default %(default)s)",
    )
    p.add_argument(
        "--routing-imbalance-requests",
        type=int,
        default=defaults.routing_imbalance_requests,
        metavar="N",
        help="cache-aware: the requests added to the imbalance threshold (default %(default)s)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=defaults.max_attempts,
        help="backends a request may try when one fails before any output with UNAVAILABLE or "
        "RESOURCE_EXHAUSTED (default %(default)s)",
    )
    p.add_argument(
        "--eject-after",
        type=int,
        default=defaults.eject_after,
        metavar="N",
        help="eject a backend after N UNAVAILABLE calls in a row (0 = never; default %(default)s)",
    )
    p.add_argument(
        "--eject-for",
        type=float,
        default=defaults.eject_s,
        metavar="SECONDS",
        help="an ejected backend gets no requests this long, then a health probe may readmit it (default %(default)s)",
    )
    p.add_argument(
        "--resolve-interval",
        type=float,
        default=defaults.resolve_interval_s,
        metavar="SECONDS",
        help="how often dns:///NAME:PORT backends are resolved again; new addresses join, vanished ones drain "
        "(default %(default)s)",
    )
    p.add_argument(
        "--load-poll-interval",
        type=float,
        default=defaults.load_poll_s,
        metavar="SECONDS",
        help="how often to read each backend's own load (ControlService.GetLoad), so routing counts the requests "
        "other gateways sent it too (0 = never; default %(default)s)",
    )
    p.add_argument(
        "--rate-limit-rpm",
        type=int,
        default=defaults.rate_limit_rpm,
        metavar="N",
        help="requests per minute per API key; over it is a 429 with Retry-After (0 = no limit)",
    )
    p.add_argument(
        "--rate-limit-tpm",
        type=int,
        default=defaults.rate_limit_tpm,
        metavar="N",
        help="tokens per minute per API key, estimated at admission as prompt + max_tokens (0 = no limit)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="json: one object per line with request and trace ids; either way one access line per "
        "request (tracing is on when OTEL_EXPORTER_OTLP_ENDPOINT names an OTLP/gRPC collector)",
    )
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        host=args.host,
        port=args.port,
        backends=tuple(args.backend or (DEFAULT_BACKEND,)),
        api_keys=_api_keys(args),
        ssl=_ssl(args),
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        max_n=args.max_n,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        backend_tls=_backend_tls(args),
        backend_api_key=_backend_api_key(args),
        strict=args.strict,
        response_store_size=args.response_store_size,
        response_store_ttl_s=args.response_store_ttl,
        metrics_require_api_key=args.metrics_require_api_key,
        routing=args.routing,
        routing_imbalance=args.routing_imbalance,
        routing_imbalance_requests=args.routing_imbalance_requests,
        max_attempts=args.max_attempts,
        eject_after=args.eject_after,
        eject_s=args.eject_for,
        resolve_interval_s=args.resolve_interval,
        load_poll_s=args.load_poll_interval,
        rate_limit_rpm=args.rate_limit_rpm,
        rate_limit_tpm=args.rate_limit_tpm,
    )


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = [k.strip() for k in args.api_key]
    if any(not k for k in keys):
        raise ValueError("--api-key must not be empty")
    if args.api_key_file:
        keys += read_api_keys(args.api_key_file)
    return tuple(dict.fromkeys(keys))


def _ssl(args: argparse.Namespace) -> SslConfig | None:
    if not (args.ssl_certfile or args.ssl_keyfile or args.ssl_ca_certs):
        return None
    if not (args.ssl_certfile and args.ssl_keyfile):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together (and --ssl-ca-certs needs both)")
    return SslConfig(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs)


def _backend_api_key(args: argparse.Namespace) -> str | None:
    return args.backend_api_key or os.environ.get("WEIR_BACKEND_API_KEY") or None


def _backend_tls(args: argparse.Namespace) -> TlsOptions | None:
    files = (args.backend_tls_ca, args.backend_tls_cert, args.backend_tls_key)
    if not (args.backend_tls or any(files)):
        return None
    return TlsOptions(*files, server_name=args.backend_tls_server_name)


def main(argv: list[str] | None = None) -> int:
    """Run the gateway; returns the process exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, secrets=(*args.api_key, _backend_api_key(args) or ""))
    try:
        config = config_from_args(args)
        ssl_context = https_context(config.ssl)  # a bad certificate or key fails here, before anything starts
    except (ValueError, OSError) as e:
        logger.error("invalid configuration: %s", e)
        return 2
    # The keys of --api-key-file are known now: no log line may hold one.
    configure_logging(args.log_level, args.log_format, secrets=(*config.api_keys, config.backend_api_key or ""))
    scheme = "http" if ssl_context is None else "https"
    logger.info("gateway on %s://%s:%d -> %s", scheme, config.host, config.port, ", ".join(config.backends))
    tracer_provider = create_tracer_provider(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"), os.environ.get("OTEL_SERVICE_NAME") or "weir-gateway"
    )
    try:
        run_app(create_app(config, tracer_provider), config, ssl_context)
    except OSError as e:
        logger.error("%s", e)
        return 1
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()  # flushes the spans still buffered
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
