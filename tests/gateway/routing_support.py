"""Real `weir serve` processes for the routing tests: a tiny random Llama (dummy weights, MiniLM's tokenizer) that
starts in seconds, on a chosen loopback address so one port can be served on 127.0.0.1 and 127.0.0.2 alike."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_LINE = "Weir is ready on"
TINY_MODEL = "tiny-llama"


def port_free_on(port: int, *hosts: str) -> bool:
    for host in hosts:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def shared_free_port(*hosts: str) -> int:
    """A port free on every one of `hosts` (a DNS name's addresses share their port)."""
    while True:
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        if port_free_on(port, *hosts):
            return port


@dataclass
class ServeProcess:
    """`weir serve` of the tiny model on HOST:PORT in a child process, its output in a log file."""

    model_dir: Path
    host: str
    port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def spawn(self) -> ServeProcess:
        argv = [sys.executable, "-m", "weir_client.cli", "serve", "--host", self.host, "--port", str(self.port),
                "--model", str(self.model_dir), "--served-model-name", TINY_MODEL, "--load-format", "dummy",
                "--max-model-len", "256", "--num-kv-blocks", "64", "--embed-model", "none",
                "--drain-timeout", "1"]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")  # several processes share few cores
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> ServeProcess:
        assert self.popen is not None
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.log:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"weir serve on {self.target} did not start:\n{self.log[-3000:]}")
            time.sleep(0.1)
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-call, as a crashed pod does."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)
