"""Issue 23's bar "nothing secret in any log line or traceback": every secret the reliability tests give a process
(its --api-key and --backend-api-key values, the keys of its --api-key-file, $WEIR_BACKEND_API_KEY) or send in a
request (through `secret()`), and every log a process of theirs wrote; the session ends by searching those logs.

A module of its own (not conftest) so that every test module and the conftest share one registry."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# A log that cuts a key short still leaks its start: aiohttp's parser errors quote the first 100 bytes of a line.
PREFIX_CHARS = 8
# Shorter values ("wrong", "") are words a log may hold for reasons of its own; tests use longer keys.
MIN_SECRET_CHARS = 8
KEY_FLAGS = ("--api-key", "--backend-api-key")
KEY_FILE_FLAG = "--api-key-file"
KEY_ENV = ("WEIR_BACKEND_API_KEY",)


@dataclass
class SecretScan:
    """The secrets of one test session and the logs that must not hold them."""

    secrets: set[str] = field(default_factory=set)
    logs: list[Path] = field(default_factory=list)

    def secret(self, value: str) -> str:
        """Record `value` as a secret and return it, so a key is recorded where the test defines it."""
        if len(value) >= MIN_SECRET_CHARS:
            self.secrets.add(value)
        return value

    def record_command(self, argv: Iterable[str], env: Mapping[str, str] | None = None) -> None:
        """The secrets a command line hands a process: key flags (`--flag KEY` or `--flag=KEY`), key files, env."""
        args = list(argv)
        for i, arg in enumerate(args):
            flag, equals, inline = arg.partition("=")
            value = inline if equals else (args[i + 1] if i + 1 < len(args) else "")
            if flag in KEY_FLAGS:
                self.secret(value.strip())
            elif flag == KEY_FILE_FLAG and value:
                self.record_key_file(Path(value))
        for name in KEY_ENV:
            if env and env.get(name):
                self.secret(env[name].strip())

    def record_key_file(self, path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return  # a test of a missing file: the process says so and holds no key
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                self.secret(line.strip())

    def log(self, path: Path) -> Path:
        """Record a log file to search at the end of the session."""
        self.logs.append(path)
        return path

    def leaks(self, logs: Iterable[Path] | None = None) -> list[str]:
        """Where a secret (or its first characters) appears in `logs` (default: every log recorded), as
        "log:line: holds secret #n ..." lines that never quote the secret."""
        numbered = sorted(self.secrets)
        needles: list[tuple[bytes, str]] = []
        for n, value in enumerate(numbered, 1):
            hint = f"secret #{n} of {len(numbered)} ({len(value)} characters)"
            needles.append((value.encode(), hint))
            if len(value) > PREFIX_CHARS:
                needles.append((value[:PREFIX_CHARS].encode(), f"the first {PREFIX_CHARS} characters of {hint}"))
        found: list[str] = []
        for path in dict.fromkeys(self.logs if logs is None else logs):  # a log recorded twice is searched once
            if not path.is_file():
                continue
            text = path.read_bytes()
            for needle, hint in needles:
                at = text.find(needle)
                if at >= 0:
                    line = text.count(b"\n", 0, at) + 1
                    found.append(f"{path}:{line}: holds {hint}")
        return found


SCAN = SecretScan()


def secret(value: str) -> str:
    """Record a key a test uses (a wrong one too) as a secret of this session; returns it unchanged."""
    return SCAN.secret(value)


def random_key(prefix: str) -> str:
    """A key whose first characters are random as well, so a log line that cuts it short still gives it away."""
    return secret(os.urandom(6).hex() + "-" + prefix + "-" + os.urandom(12).hex())
