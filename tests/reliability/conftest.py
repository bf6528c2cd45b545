"""Fixtures for the reliability tests: servers and gateways as real processes (to signal or kill them), an
in-process server with a small admission budget (to read its engine's counters), and test certificates.

Every process's log is kept, and every key a process is given is recorded (secret_scan.py); the session ends by
searching all those logs, and this process's own warnings and tracebacks, for the keys."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from secret_scan import SCAN

T = TypeVar("T")
READY_LINE = "Weir is ready on"
# Small admission budget: 4 running + 4 waiting requests is the engine's capacity in the soak.
SMALL_MAX_NUM_SEQS = 4
SMALL_MAX_WAITING = 4
SMALL_KV_BLOCKS = 12  # tight on purpose: a full batch preempts (recomputes) instead of failing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tally:
    """What happened to the requests of one test; printed so `pytest -s` shows the numbers."""

    name: str
    sent: int = 0
    answered: int = 0
    refused: int = 0  # 429 / RESOURCE_EXHAUSTED, or UNAVAILABLE where the test expects refusals
    failed: int = 0
    disconnected: int = 0  # clients that hung up on purpose
    hung: int = 0
    other: dict[str, int] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)

    def note(self, kind: str) -> None:
        self.other[kind] = self.other.get(kind, 0) + 1

    def report(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in sorted({**self.other, **self.info}.items()))
        line = (
            f"[{self.name}] sent={self.sent} answered={self.answered} refused={self.refused} failed={self.failed} "
            f"disconnected={self.disconnected} hung={self.hung}{extra}"
        )
        print(line, flush=True)
        return line


class Process:
    """A Weir command running as a child process, its output in a log file; killed at teardown if still alive."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = SCAN.log(log_path)
        SCAN.record_command(argv, env)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited with {self.popen.returncode}:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout:.0f}s:\n{self.log[-3000:]}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)
        self._log.close()


@dataclass
class ServerProcess:
    process: Process
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class GatewayProcess:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def tiny_smollm2_models(model_dir: Path, *flags: str) -> tuple[str, ...]:
    """`model_args` for the tiny random Llama over SmolLM2's tokenizer (the `tiny_smollm2` fixture), served under
    SmolLM2's name: SmolLM2's tokens, templates and limits, started in seconds where the packaged GGUF, dummy weights or
    not, takes half a minute. For tests whose work is not the model's (a dummy model's speed matters to drain tests)."""
    return ("--model", str(model_dir), "--served-model-name", "smollm2-135m-instruct", "--load-format", "dummy", *flags)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # several processes share 2 cores
    return env


class Launcher:
    """Starts `weir serve` and `weir gateway` processes, waits until they are ready, and kills leftovers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    def server(
        self, *extra: str, model_args: tuple[str, ...] | None = None, ready_timeout: float = 240
    ) -> ServerProcess:
        """A server with dummy-weight SmolLM2 (unless `model_args` says otherwise), once it logs that it is ready."""
        port = free_port()
        models = model_args or ("--load-format", "dummy", "--max-model-len", "512", "--embed-model", "none")
        argv = [sys.executable, "-m", "weir_client.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--kv-cache-memory-gb", "0.1", *models, *extra]  # fmt: skip
        process = Process(argv, self.directory / f"server-{port}.log", _child_env())
        self.started.append(process)
        process.wait_for_log(READY_LINE, ready_timeout)
        return ServerProcess(process, port)

    def gateway(self, backends: list[str], *extra: str, ready_timeout: float = 60) -> GatewayProcess:
        """A gateway in front of `backends`, once its /health answers 200."""
        port = free_port()
        argv = [sys.executable, "-m", "weir_client.cli", "gateway", "--port", str(port)]
        for backend in backends:
            argv += ["--backend", backend]
        process = Process([*argv, *extra], self.directory / f"gateway-{port}.log", _child_env())
        self.started.append(process)
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return GatewayProcess(process, port)
            except (urllib.error.URLError, OSError):
                pass
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway not healthy:\n{process.log[-3000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        for process in self.started:
            process.close()


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the last reliability test (whichever tests ran, in whatever order): no log of a process they started,
    nor a warning or traceback of this process (in-process servers), holds a recorded key or its first characters."""
    own_log = SCAN.log(tmp_path_factory.mktemp("logs") / "pytest-process.log")
    handler = logging.FileHandler(own_log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    leaks = SCAN.leaks()
    print(f"[secret-scan] {len(SCAN.secrets)} secrets, {len(set(SCAN.logs))} logs, {len(leaks)} leaks", flush=True)
    assert not leaks, "a key leaked into a log:\n" + "\n".join(leaks)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    running = Launcher(tmp_path)
    yield running
    running.close()


@pytest.fixture
def spawn_server(launcher: Launcher) -> Callable[..., ServerProcess]:
    return launcher.server


@pytest.fixture
def spawn_gateway(launcher: Launcher) -> Callable[..., GatewayProcess]:
    return launcher.gateway


class InProcessServer:
    """A WeirServer on its own event loop thread, so tests can read its engine and patch it."""

    def __init__(self, config: Any) -> None:
        from weir_server.api.server import WeirServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="weir-reliability-server", daemon=True)
        self.thread.start()
        self.server: WeirServer = self.run(self._create(WeirServer, config))
        self.run(self.server.start())

    @staticmethod
    async def _create(factory: Any, config: Any) -> Any:
        return factory(config)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return self.server.address

    @property
    def engine(self) -> Any:
        model = self.server.registry.default("generate")
        assert model is not None and model.generator is not None
        return model.generator

    def wait_engine_idle(self, timeout: float = 30) -> Any:
        """Wait until nothing runs or waits and every KV block is free again; return the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            idle = stats.num_running == 0 and stats.num_waiting == 0
            if idle and stats.num_free_blocks == stats.num_total_blocks:
                return stats
            if time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def stop(self) -> None:
        self.run(self.server.stop(grace=1.0), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="session")
def small_server() -> Iterator[InProcessServer]:
    """The packaged SmolLM2 and MiniLM behind a server whose engine admits 4 running + 4 waiting requests."""
    from weir_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig

    generate = EngineConfig(
        ModelConfig("smollm2-135m-instruct", max_model_len=512),
        cache=CacheConfig(num_blocks=SMALL_KV_BLOCKS),
        scheduler=SchedulerConfig(max_num_seqs=SMALL_MAX_NUM_SEQS, max_waiting=SMALL_MAX_WAITING),
    )
    config = ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=ModelConfig("all-minilm-l6-v2"))
    server = InProcessServer(config)
    yield server
    server.stop()


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1 and a client certificate it signed, and a
    client certificate from an unrelated CA."""

    directory: Path

    def pem(self, name: str) -> str:
        return str(self.directory / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.directory / f"{name}.key")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=cwd)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


def _make_ca(cwd: Path, name: str, subject: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", subject, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    cwd = tmp_path_factory.mktemp("certs")
    _make_ca(cwd, "ca", "/CN=Weir test CA")
    _make_ca(cwd, "rogue_ca", "/CN=Someone else's CA")
    _issue(cwd, "server", "ca", "/CN=localhost",
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")  # fmt: skip
    _issue(cwd, "client", "ca", "/CN=weir-client", "extendedKeyUsage=clientAuth")
    _issue(cwd, "rogue_client", "rogue_ca", "/CN=weir-client", "extendedKeyUsage=clientAuth")
    return Certs(cwd)


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call of a channel (`grpc.intercept_channel`), raw calls included."""

    def __init__(self, key: str) -> None:
        self.metadata = ("authorization", f"Bearer {key}")

    def _with_key(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self.metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)


def keyed_channel(target: str, key: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """An insecure channel whose calls carry `key`; close it with `.close()` (or `with`)."""
    return grpc.intercept_channel(grpc.insecure_channel(target, options=options), BearerKey(key))


HEALTH_POLL_S = 0.05
HEALTH_BOUND_S = 1.0  # the longest a health check may wait while hostile work runs (issue 23)


@dataclass
class HealthProbe:
    """Polls grpc.health.v1 every 50 ms on its own channel and keeps the longest wait and every status seen; with
    `pid`, also the largest resident set size of that process."""

    target: str
    pid: int | None = None
    waits: list[float] = field(default_factory=list)
    statuses: set[str] = field(default_factory=set)
    max_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> HealthProbe:
        self._thread = threading.Thread(target=self._poll, name="health-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _poll(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def check() -> str:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as e:
                    return e.code().name

            self._loop(check)

    def _loop(self, check: Callable[[], str]) -> None:
        """Run `check` (it returns a status) every HEALTH_POLL_S until stopped, timing each."""
        while not self._stop.is_set():
            started = time.monotonic()
            self.statuses.add(check())
            self.waits.append(time.monotonic() - started)
            if self.pid is not None:
                self.max_rss = max(self.max_rss, rss_bytes(self.pid))
            self._stop.wait(HEALTH_POLL_S)

    @property
    def worst(self) -> float:
        return max(self.waits, default=0.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now (0 once it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def terminate(process: Process, timeout: float = 120) -> int:
    """SIGTERM a process and return its exit code."""
    process.signal(signal.SIGTERM)
    return process.wait(timeout)
