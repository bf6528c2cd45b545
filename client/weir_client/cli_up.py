"""`weir up`: the gRPC server and the gateway in front of it, as two child processes built from one command line.

API keys and TLS are given once and apply to both; `--gateway-NAME` is the gateway's own `--NAME`; every other
option goes to `weir serve`. The whole command line is checked before the server starts loading its models.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType, ModuleType
from typing import Any, NoReturn

from weir_client.client import WeirClient
from weir_client.errors import WeirClientError
from weir_client.security import TlsOptions, read_api_keys, server_ssl_context

GATEWAY_PREFIX = "--gateway-"
# Gateway options `weir up` sets itself: its backend is the server it starts.
_GATEWAY_OWN = frozenset({"-h", "--help", "--backend"})
_EPILOG = """\
server and gateway alike: --api-key/--api-key-file protect both (the gateway presents the first key to the
server), and --ssl-certfile/--ssl-keyfile make both speak TLS (gRPC over TLS, HTTPS); the gateway then trusts
--ssl-certfile as the server's CA, which suits a self-signed certificate (for one a CA issued, pass
--gateway-backend-tls-ca CA.pem, or --gateway-backend-tls for the system roots).

gateway options: every option of `weir gateway --help`, spelled with a --gateway- prefix, e.g.
--gateway-port 8080, --gateway-max-tokens 4096, --gateway-cors-origin '*', --gateway-strict.

server options: everything else goes to `weir serve` (see `weir serve --help`), e.g. --model, --max-model-len.

example: weir up --api-key-file keys.txt --ssl-certfile cert.pem --ssl-keyfile key.pem --gateway-port 8443
"""


@dataclass(frozen=True)
class UpConfig:
    """The two command lines `weir up` runs, and how it knows the server is ready."""

    target: str  # HOST:PORT the gateway and the readiness check dial
    serve_args: tuple[str, ...] = field(repr=False)  # may carry --api-key values
    gateway_args: tuple[str, ...] | None = field(repr=False)  # None = no gateway
    gateway_env: dict[str, str] = field(default_factory=dict, repr=False)
    health_tls: TlsOptions | None = None
    ready_timeout_s: float = 600.0


class _ForwardToGateway(argparse.Action):
    """`--gateway-NAME [VALUE]`: kept, in order, as the gateway's `--NAME [VALUE]`."""

    def __init__(self, option_strings: Sequence[str], dest: str, forward_as: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.forward_as = forward_as

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        forwarded = [*(getattr(namespace, "gateway_args", None) or []), self.forward_as]
        if self.nargs != 0:
            forwarded.append(str(values))
        namespace.gateway_args = forwarded


def _gateway_cli() -> ModuleType | None:
    try:
        return importlib.import_module("weir_gateway.cli")
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "weir_gateway":
            raise
        return None


class _UpParser(argparse.ArgumentParser):
    """A bad option is one line on stderr (the usage of every gateway option would bury it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(gateway_cli: ModuleType | None) -> argparse.ArgumentParser:
    """The options of `weir up`: its own, the shared ones, and the gateway's behind --gateway-."""
    p = _UpParser(
        prog="weir up",
        description="Run the gRPC server and the OpenAI-compatible gateway together.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an abbreviation of ours must not swallow an option meant for `weir serve`
    )
    p.add_argument("--host", default="127.0.0.1", help="gRPC server address (default %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC server port (default %(default)s)")
    p.add_argument("--no-gateway", action="store_true", help="run only the gRPC server")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    p.set_defaults(gateway_args=None)  # the --gateway- options given, as the gateway spells them
    shared = p.add_argument_group("server and gateway alike")
    shared.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require `authorization: Bearer KEY` on both; repeat for several keys",
    )
    shared.add_argument(
        "--api-key-file", metavar="PATH", help="API keys, one per line (blank lines and # comments skipped)"
    )
    shared.add_argument("--ssl-certfile", "--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
    shared.add_argument("--ssl-keyfile", "--tls-key", metavar="PEM", help="the private key of --ssl-certfile")
    shared.add_argument(
        "--ssl-ca-certs",
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: both require client certificates signed by this CA (give the gateway its own with "
        "--gateway-backend-tls-cert/--gateway-backend-tls-key)",
    )
    if gateway_cli is None:
        hidden = p.add_argument_group("gateway (not installed: install weir[gateway])")
        hidden.add_argument("--gateway-host", help=argparse.SUPPRESS)
        hidden.add_argument("--gateway-port", help=argparse.SUPPRESS)
    else:
        _add_gateway_options(p.add_argument_group("gateway options (see `weir gateway --help`)"), gateway_cli)
    return p


def _add_gateway_options(group: argparse._ArgumentGroup, gateway_cli: ModuleType) -> None:
    gateway_parser: argparse.ArgumentParser = gateway_cli.build_parser()
    for action in gateway_parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or _GATEWAY_OWN.intersection(action.option_strings):
            continue
        names = [GATEWAY_PREFIX + name[2:] for name in action.option_strings if name.startswith("--")]
        checked: dict[str, Any] = {"type": action.type} if action.type else {}  # checked here, named as ours
        group.add_argument(
            *names,
            action=_ForwardToGateway,
            forward_as=action.option_strings[0],
            dest=f"gateway:{action.dest}",
            nargs=0 if action.nargs == 0 else None,
            choices=action.choices,
            **checked,
            default=action.default,  # shown by %(default)s in the help; only the forwarded tokens are read
            metavar=action.metavar or (None if action.choices else action.dest.upper()),
            help=action.help,
        )


def config_from_args(args: argparse.Namespace, serve_rest: list[str], gateway_cli: ModuleType | None) -> UpConfig:
    """Both command lines; ValueError/OSError for anything that would stop one of them."""
    unknown = [a.partition("=")[0] for a in serve_rest if a.startswith(GATEWAY_PREFIX)]
    if unknown and gateway_cli is not None:
        raise ValueError(
            f"{unknown[0]} is not a gateway option (see `weir gateway --help`; --backend is set by weir up)"
        )
    keys = [k.strip() for k in args.api_key]
    if any(not k for k in keys):
        raise ValueError("--api-key must not be empty")
    if args.api_key_file:
        keys += read_api_keys(args.api_key_file)
    shared: list[str] = []
    for key in args.api_key:
        shared += ["--api-key", key]
    if args.api_key_file:
        shared += ["--api-key-file", args.api_key_file]
    if args.ssl_certfile or args.ssl_keyfile or args.ssl_ca_certs:
        if not (args.ssl_certfile and args.ssl_keyfile):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together (and --ssl-ca-certs needs both)")
        server_ssl_context(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs)  # the files, checked now
        # The spelling `weir serve` knows; the gateway takes it too.
        shared += ["--tls-cert", args.ssl_certfile, "--tls-key", args.ssl_keyfile]
        if args.ssl_ca_certs:
            shared += ["--tls-client-ca", args.ssl_ca_certs]
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    target = f"{connect_host}:{args.port}"
    serve_args = ("--host", args.host, "--port", str(args.port), *shared, *serve_rest)
    if args.no_gateway:
        return UpConfig(target, serve_args, None, ready_timeout_s=args.ready_timeout)
    if gateway_cli is None:
        raise ValueError("the gateway is not installed (install weir[gateway]), or pass --no-gateway")
    forwarded: list[str] = args.gateway_args or []
    backend: list[str] = []
    if args.ssl_certfile and not any(a.startswith("--backend-tls") for a in forwarded):
        backend += ["--backend-tls-ca", args.ssl_certfile]
    env: dict[str, str] = {}
    if keys and "--backend-api-key" not in forwarded:
        env["WEIR_BACKEND_API_KEY"] = keys[0]  # the environment, not argv: out of `ps`
    gateway_args = ("--backend", target, *shared, *backend, *forwarded)
    gateway = gateway_cli.config_from_args(gateway_cli.build_parser().parse_args(gateway_args))
    if gateway.ssl is not None and gateway.ssl.certfile != args.ssl_certfile:  # a --gateway-ssl-* of its own
        server_ssl_context(gateway.ssl.certfile, gateway.ssl.keyfile, gateway.ssl.ca_certs)
    health_tls: TlsOptions | None = gateway.backend_tls
    if args.ssl_ca_certs and (health_tls is None or health_tls.cert_file is None):
        raise ValueError(
            "--ssl-ca-certs makes the server ask for client certificates: give the gateway one with "
            "--gateway-backend-tls-cert and --gateway-backend-tls-key"
        )
    return UpConfig(target, serve_args, gateway_args, env, health_tls, args.ready_timeout)


def main(argv: list[str]) -> int:
    """`weir up ARGS`; returns the exit code (2: a bad command line, found before anything starts)."""
    gateway_cli = _gateway_cli()
    args, serve_rest = build_parser(gateway_cli).parse_known_args(argv)
    try:
        config = config_from_args(args, serve_rest, gateway_cli)
    except (ValueError, OSError) as e:
        print(f"weir up: {e}", file=sys.stderr)
        return 2
    return run(config)


def run(config: UpConfig) -> int:
    """Start `weir serve`, wait until it is SERVING, then start `weir gateway`; stop both on SIGTERM/SIGINT."""
    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(_spawn(["serve", *config.serve_args]))
        if config.gateway_args is not None:
            ready = _wait_serving(config, children[0], lambda: stop_requested)
            if not ready:
                return _stop_all(children, failed=not stop_requested)
            children.append(_spawn(["gateway", *config.gateway_args], config.gateway_env))
        while not stop_requested and all(c.poll() is None for c in children):
            time.sleep(0.2)
        return _stop_all(children, failed=not stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "weir_client.cli", *argv], env={**os.environ, **(env or {})})


def _wait_serving(config: UpConfig, server: subprocess.Popen[bytes], stopping: Callable[[], bool]) -> bool:
    """Poll the server's health until SERVING; False if it exits, a stop is requested, or time runs out."""
    deadline = time.monotonic() + config.ready_timeout_s
    with WeirClient(config.target, max_attempts=1, tls=config.health_tls) as client:
        while time.monotonic() < deadline and not stopping():
            if server.poll() is not None:
                print(f"weir up: the server exited with code {server.returncode}", file=sys.stderr)
                return False
            try:
                if client.health(timeout=1.0) == "SERVING":
                    return True
            except WeirClientError:
                pass  # not listening yet, or still loading
            time.sleep(0.5)
    if not stopping():
        print(f"weir up: the server was not SERVING within {config.ready_timeout_s:.0f}s", file=sys.stderr)
    return False


def _stop_all(children: list[subprocess.Popen[bytes]], failed: bool, grace: float = 40.0) -> int:
    """SIGTERM every child still running, wait for them (SIGKILL after `grace`), return an exit code."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    codes = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return codes[0] if failed and codes else (1 if failed else 0)
