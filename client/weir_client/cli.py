"""The `weir` command: serve, gateway, up, bench, and small client commands (generate, embed, tokenize, models)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from weir_client import cli_generate
from weir_client.client import WeirClient
from weir_client.errors import WeirClientError
from weir_client.security import TlsOptions

DEFAULT_TARGET = "localhost:50051"
# Commands that belong to other packages: (module with `main(argv) -> int`, what to install when missing).
_DELEGATED = {
    "serve": ("weir_server.cli", "weir[server]", "run the gRPC inference server (see `weir serve --help`)"),
    "gateway": ("weir_gateway.cli", "weir[gateway]", "run the OpenAI-compatible HTTP gateway"),
    "bench": ("weir_bench.cli", "the weir_bench package", "run benchmarks (see `weir bench --help`)"),
}


def _delegate(command: str, argv: list[str]) -> int:
    module_name, extra, _ = _DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name.split(".")[0]):
            raise
        print(f"weir {command} is not available: {module_name} is not installed (install {extra})", file=sys.stderr)
        return 2
    result: int = module.main(argv)
    return result


# ---- weir up -------------------------------------------------------------------------------------------------


def _up(argv: list[str]) -> int:
    """Start `weir serve` (extra options pass through), wait until it is SERVING, then start `weir gateway`."""
    p = argparse.ArgumentParser(
        prog="weir up", description="Run the server and the gateway together; other options go to `weir serve`."
    )
    p.add_argument("--host", default="127.0.0.1", help="gRPC server address (default %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC server port (default %(default)s)")
    p.add_argument("--gateway-host", default="127.0.0.1", help="HTTP gateway address (default %(default)s)")
    p.add_argument("--gateway-port", type=int, default=8000, help="HTTP gateway port (default %(default)s)")
    p.add_argument("--no-gateway", action="store_true", help="run only the gRPC server")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    args, serve_args = p.parse_known_args(argv)
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    target = f"{connect_host}:{args.port}"

    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(_spawn(["serve", "--host", args.host, "--port", str(args.port), *serve_args]))
        if not args.no_gateway:
            if not _wait_serving(target, children[0], args.ready_timeout, lambda: stop_requested):
                return _stop_all(children, failed=not stop_requested)
            gateway_args = ["--host", args.gateway_host, "--port", str(args.gateway_port), "--backend", target]
            children.append(_spawn(["gateway", *gateway_args]))
        while not stop_requested and all(c.poll() is None for c in children):
            time.sleep(0.2)
        return _stop_all(children, failed=not stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "weir_client.cli", *argv])


def _wait_serving(target: str, server: subprocess.Popen[bytes], timeout: float, stopping: Callable[[], bool]) -> bool:
    """Poll the server's health until SERVING; False if it exits, a stop is requested, or time runs out."""
    deadline = time.monotonic() + timeout
    with WeirClient(target, max_attempts=1) as client:
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
        print(f"weir up: the server was not SERVING within {timeout:.0f}s", file=sys.stderr)
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


# ---- client commands -----------------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        return cli_generate.run(client, args)


def _embed(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        result = client.embed(args.texts, model=args.model, normalize=not args.no_normalize, dimensions=args.dimensions)
    for vector in result.vectors:
        print(json.dumps([round(v, 6) for v in vector]))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        results = client.tokenize(
            args.texts, model=args.model, add_special_tokens=not args.no_special_tokens, return_offsets=args.offsets
        )
    for result in results:
        line: dict[str, object] = {"token_ids": result.token_ids, "tokens": result.tokens}
        if result.offsets is not None:
            line["offsets"] = result.offsets
        print(json.dumps(line, ensure_ascii=False))
    return 0


def _models(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        models = client.list_models()
    rows = [("ID", "TASK", "CONTEXT", "VOCAB", "ARCHITECTURE", "DTYPE", "DEVICE", "DEFAULT")]
    for m in models:
        numbers = (str(m.max_context_length), str(m.vocab_size))
        rows.append((m.id, m.task, *numbers, m.architecture, m.dtype, m.device, "yes" if m.is_default else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _connect(args: argparse.Namespace) -> WeirClient:
    """A client for the connection options every client command takes."""
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    api_key = args.api_key or os.environ.get("WEIR_API_KEY") or None
    return WeirClient(args.target, timeout=args.timeout, tls=tls, api_key=api_key)


def _client_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--target", default=DEFAULT_TARGET, help="gRPC server HOST:PORT (default %(default)s)")
    p.add_argument("--model", default="", help="model id (default: the server's default for the task)")
    p.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    p.add_argument("--tls", action="store_true", help="connect over TLS (server verified against the system roots)")
    p.add_argument("--tls-ca", metavar="PEM", help="TLS: verify the server against this CA instead")
    p.add_argument("--tls-cert", metavar="PEM", help="mutual TLS: this client certificate")
    p.add_argument("--tls-key", metavar="PEM", help="mutual TLS: the key of --tls-cert")
    p.add_argument("--tls-server-name", metavar="NAME", help="TLS: the name the server certificate must carry")
    p.add_argument("--api-key", help="send `authorization: Bearer KEY` (default: $WEIR_API_KEY)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The `weir` command line (serve, gateway and bench parse their own options)."""
    parser = argparse.ArgumentParser(prog="weir", description="Weir: gRPC inference for language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help) in _DELEGATED.items():
        sub.add_parser(name, help=help, add_help=False)
    sub.add_parser("up", help="run the server and the gateway together (`make serve`)", add_help=False)

    p = _client_parser(sub, "generate", "stream a completion of a prompt")
    cli_generate.add_arguments(p)
    p.set_defaults(run=_generate)

    p = _client_parser(sub, "embed", "print one embedding (a JSON array) per text")
    p.add_argument("texts", nargs="+")
    p.add_argument("--dimensions", type=int)
    p.add_argument("--no-normalize", action="store_true")
    p.set_defaults(run=_embed)

    p = _client_parser(sub, "tokenize", "print the tokens of each text as JSON")
    p.add_argument("texts", nargs="+")
    p.add_argument("--offsets", action="store_true", help="include character offsets")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/CLS/... tokens")
    p.set_defaults(run=_tokenize)

    p = _client_parser(sub, "models", "list the models a server has loaded")
    p.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `weir` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    if argv and argv[0] == "up":
        return _up(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except WeirClientError as e:
        print(f"\nerror: {e}" if args.command == "generate" else f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad TLS files or options, found before any call
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
