"""`weir gateway`: parse arguments into a GatewayConfig and serve the OpenAI API until interrupted."""

from __future__ import annotations

import argparse
import logging

from aiohttp import web
from weir_gateway.app import create_app
from weir_gateway.config import DEFAULT_BACKEND, GatewayConfig

logger = logging.getLogger("weir_gateway")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The gateway's arguments (on `parser` when a caller embeds them in its own command)."""
    defaults = GatewayConfig()
    p = parser or argparse.ArgumentParser(prog="weir gateway", description="OpenAI-compatible HTTP API over Weir")
    p.add_argument("--backend", action="append", metavar="HOST:PORT",
                   help=f"a Weir gRPC server; repeat for several (default {DEFAULT_BACKEND})")
    p.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=defaults.port, help="port to listen on (default %(default)s)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require `Authorization: Bearer KEY`; repeat for several keys")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN ('*' for any); CORS is off by default")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--max-n", type=int, default=defaults.max_n, help="most choices per prompt")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="most tokens per choice")
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                   help="seconds before a backend call is abandoned (its gRPC deadline)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        host=args.host,
        port=args.port,
        backends=tuple(args.backend or (DEFAULT_BACKEND,)),
        api_keys=tuple(args.api_key),
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the gateway; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    logger.info("gateway on http://%s:%d -> %s", config.host, config.port, ", ".join(config.backends))
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        handler_cancellation=True,  # a client that disconnects cancels its gRPC call at once
        print=None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
