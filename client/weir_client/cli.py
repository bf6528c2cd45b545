"""The `weir` command: serve, gateway, up, bench, and client commands (generate, chat, embed, tokenize, models)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys

from weir_client import cli_chat, cli_generate, cli_up
from weir_client.client import WeirClient
from weir_client.errors import WeirClientError
from weir_client.security import TlsOptions

DEFAULT_TARGET = "localhost:50051"
# Commands that belong to other packages: (module with `main(argv) -> int`, what to install when missing).
_PIP = "`pip install {0}` (from a checkout: `pip install ./{1}`)"
_DELEGATED = {
    "serve": (
        "weir_server.cli",
        _PIP.format("weir-server", "server"),
        "run the gRPC inference server (see `weir serve --help`)",
    ),
    "gateway": ("weir_gateway.cli", _PIP.format("weir-gateway", "gateway"), "run the OpenAI-compatible HTTP gateway"),
    "bench": ("weir_bench.cli", _PIP.format("weir-bench", "bench"), "run benchmarks (see `weir bench --help`)"),
}
_DISTRIBUTIONS = ("weir-client", "weir-server", "weir-gateway", "weir-bench")


def installed_versions() -> str:
    """`weir-client 0.1.0` and one such line for each other Weir distribution installed beside it."""
    lines = []
    for distribution in _DISTRIBUTIONS:
        try:
            lines.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional part that is not installed
    return "\n".join(lines)


class _PrintVersions(argparse.Action):
    """`weir --version`: one line per installed distribution (argparse's own version action joins the lines)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(installed_versions())
        parser.exit()


def _delegate(command: str, argv: list[str]) -> int:
    module_name, extra, _ = _DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name.split(".")[0]):
            raise
        print(f"weir {command} is not available: {module_name} is not installed: run {extra}", file=sys.stderr)
        return 2
    result: int = module.main(argv)
    return result


# ---- client commands -----------------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        return cli_generate.run(client, args)


def _chat(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        return cli_chat.run(client, args)


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
    p.add_argument(
        "--target",
        default=os.environ.get("WEIR_TARGET") or DEFAULT_TARGET,  # as the examples read it
        help=f"gRPC server HOST:PORT (default: $WEIR_TARGET, else {DEFAULT_TARGET})",
    )
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
    parser.add_argument("-V", "--version", action=_PrintVersions, help="print the installed Weir versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help) in _DELEGATED.items():
        sub.add_parser(name, help=help, add_help=False)
    sub.add_parser("up", help="run the server and the gateway together (`make serve`)", add_help=False)

    p = _client_parser(sub, "generate", "stream a completion of a prompt")
    cli_generate.add_arguments(p)
    p.set_defaults(run=_generate)

    p = _client_parser(sub, "chat", "chat with a model in the terminal (history, streaming, /reset, /system)")
    cli_chat.add_arguments(p)
    p.set_defaults(run=_chat)

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
        return cli_up.main(argv[1:])
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
