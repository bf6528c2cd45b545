"""Every command the README and docs/ show works as written.

Shell blocks fenced ```sh runnable (or ```bash runnable) run with `bash -euo pipefail` from the repository root,
the venv's bin first on PATH, against a real server and gateway serving the packaged models. They address them as
a user would, at `localhost:50051` (gRPC) and `localhost:8000` (HTTP), which the test rewrites to the servers it
started; WEIR_TARGET and WEIR_GATEWAY_URL name them too. Every other `weir ...` line in a shell block (servers,
`make serve SERVE_ARGS=...`, TLS set-ups) is parsed by the real command's parser without running, so a renamed
flag fails here. The convention is stated in docs/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples" / "README.md"]
SHELLS = {"sh", "bash", "shell", "console"}
# What runnable blocks say, and what the test puts there instead.
GRPC_ADDRESSES = ("localhost:50051", "127.0.0.1:50051")
HTTP_ADDRESSES = ("localhost:8000", "127.0.0.1:8000")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)(?P<info>.*)$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
# `make TARGET VAR="..."`: the weir command the variable's options go to (see the Makefile).
_MAKE_VARIABLES = {"SERVE_ARGS": "up", "BENCH_ARGS": "bench"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its info string and its text."""

    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runnable(self) -> bool:
        return "runnable" in self.info.split()[1:]


def fenced_blocks(path: Path) -> Iterator[Block]:
    """The fenced code blocks of a Markdown file (indented ones inside lists too)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])
        ):
            body.append(lines[j][indent:] if not lines[j][:indent].strip() else lines[j].lstrip())
            j += 1
        yield Block(path, i + 1, opening["info"].strip(), "\n".join(body) + "\n")
        i = j + 1


def shell_blocks() -> list[Block]:
    return [block for path in DOCS if path.exists() for block in fenced_blocks(path) if block.language in SHELLS]


def commands(text: str) -> Iterator[str]:
    """The shell text's commands: lines joined across `\\` continuations and open quotes, comments kept."""
    pending = ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        yield pending
        pending = ""
    if pending:
        yield pending


def weir_invocations(command: str) -> Iterator[list[str]]:
    """The argv (after `weir`) of each weir command in one shell command, and of `make serve SERVE_ARGS=...`."""
    segment: list[str] = []
    for token in [*shlex.split(command, comments=True), ";"]:
        if token not in _SEPARATORS and not token.startswith((">", "<", "2>")):
            segment.append(token)
            continue
        words = [w for w in segment if not _ASSIGNMENT.match(w)]
        if words and (words[0] == "weir" or words[0].endswith("/weir")):
            yield words[1:]
        elif words and words[0] == "make":
            for word in segment[1:]:
                name, _, value = word.partition("=")
                if name in _MAKE_VARIABLES:
                    yield [_MAKE_VARIABLES[name], *shlex.split(value)]
        segment = []


def strict(parser: Any) -> Any:
    """`parser` (and its subcommands) without abbreviations: `--max-num-seq` must not pass for `--max-num-seqs`."""
    parser.allow_abbrev = False
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of subcommands
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                strict(sub)
    return parser


def check_weir_argv(argv: list[str]) -> None:
    """Parse `weir ARGV` with the parser the real command uses, without running it (SystemExit on a bad flag)."""
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "serve":
        from weir_server import cli as serve_cli

        serve_cli.parse_args(rest, strict(serve_cli.build_parser()))
    elif command == "gateway":
        from weir_gateway import cli as gateway_cli

        strict(gateway_cli.build_parser()).parse_args(rest)
    elif command == "up":
        from weir_client import cli_up
        from weir_gateway import cli as gateway_cli
        from weir_server import cli as serve_cli

        _, serve_rest = cli_up.build_parser(gateway_cli).parse_known_args(rest)  # no abbreviations of its own
        stray = [a for a in serve_rest if a.startswith(cli_up.GATEWAY_PREFIX)]
        assert not stray, f"{stray[0]} is not a gateway option"
        serve_cli.parse_args(serve_rest, strict(serve_cli.build_parser()))  # what `weir up` passes to `weir serve`
    elif command == "bench":
        from weir_bench import cli as bench_cli

        if rest and rest[0] in bench_cli.SUBCOMMANDS:
            module = importlib.import_module(bench_cli.SUBCOMMANDS[rest[0]][0])
            strict(module.build_parser()).parse_args(rest[1:])
        else:
            strict(bench_cli.build_parser()).parse_args(rest)
    else:
        from weir_client import cli as client_cli

        strict(client_cli.build_parser()).parse_args(argv)


BLOCKS = shell_blocks()
RUNNABLE = [block for block in BLOCKS if block.runnable]
PARSED = [
    pytest.param(argv, id=f"{block.where} weir {' '.join(argv)[:60]}")
    for block in BLOCKS
    if not block.runnable
    for command in commands(block.text)
    for argv in weir_invocations(command)
]


def test_the_docs_have_runnable_blocks_and_weir_lines_to_check() -> None:
    assert len(RUNNABLE) >= 10 and len(PARSED) >= 10
    assert {block.path.name for block in RUNNABLE} >= {"README.md", "serving.md", "grpc.md", "openai.md"}


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_runnable_block_renders_as_a_shell_block(block: Block) -> None:
    """GitHub takes the first word of the info string as the language: `sh runnable` still renders as sh."""
    assert block.language in ("sh", "bash"), f"{block.where}: fence it ```sh runnable"


@pytest.mark.parametrize("argv", PARSED)
def test_weir_command_line_in_the_docs_parses(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # `--config examples/serve.yaml` is read from the repository root, as documented
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            check_weir_argv(argv)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"weir {shlex.join(argv)}: {stderr.getvalue().strip()}"


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\((?!https?://|#|mailto:)([^)\s#]+)", path.read_text(encoding="utf-8")):
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken


@pytest.fixture(scope="module")
def docs_servers(weir_server: Any, gateway_url: str) -> tuple[str, str]:
    """(gRPC HOST:PORT, gateway HOST:PORT): the session's server and the real gateway over it."""
    return weir_server.target, gateway_url.removeprefix("http://").removesuffix("/v1")


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_runnable_block_runs_against_a_real_server_and_gateway(block: Block, docs_servers: tuple[str, str]) -> None:
    grpc_address, http_address = docs_servers
    script = block.text
    for address in GRPC_ADDRESSES:
        script = script.replace(address, grpc_address)
    for address in HTTP_ADDRESSES:
        script = script.replace(address, http_address)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WEIR_", "OTEL_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        WEIR_TARGET=grpc_address,
        WEIR_GATEWAY_URL=f"http://{http_address}/v1",
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"{block.where} exited {result.returncode}:\n{script}\n{result.stdout}{result.stderr}"
    )
