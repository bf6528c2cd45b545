"""Helpers for the operations tests: Weir servers in subprocesses (found through their JSON log lines), an
in-process gateway, and a Prometheus text parser."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from weir_gateway.app import create_app
from weir_gateway.config import GatewayConfig
from weir_gateway.state import POOL

READY = re.compile(r"Weir is ready on (\S+):(\d+)")
METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
REPO = Path(__file__).resolve().parents[2]
TINY_MODEL_NAME = "tiny-llama"  # what the traced server calls its tiny model (--served-model-name)
# The tiny model's tokenizer (MiniLM's) has no chat template: this one lets the tests send chats.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@dataclass
class ServerProcess:
    """`weir serve` in a subprocess with JSON logs; `target` and `metrics_url` come from its log lines."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    target: str = ""
    metrics_url: str = ""
    lines: list[dict[str, Any]] = field(default_factory=list)

    _found: queue.Queue[str] = field(default_factory=queue.Queue)

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        self.spawn()
        return self.wait_ready(timeout_s)

    def spawn(self) -> None:
        command = [sys.executable, "-m", "weir_server.cli", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.process = subprocess.Popen(
            command, env={**os.environ, **self.env}, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            cwd=REPO,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self._found,), daemon=True).start()

    def wait_ready(self, timeout_s: float = 120.0) -> ServerProcess:
        """Block until the server logs that it is ready (models loaded); raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while not self.target:
            try:
                line = self._found.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise TimeoutError(f"server did not start: {self.lines[-5:]}") from None
            if (m := METRICS.search(line)) is not None:
                self.metrics_url = f"http://{m[1]}:{m[2]}/metrics"
            if (m := READY.search(line)) is not None:
                self.target = f"{m[1]}:{m[2]}"
        return self

    def _read(self, found: queue.Queue[str]) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                entry = {"message": raw.rstrip()}
            self.lines.append(entry)
            found.put(str(entry.get("message", "")))
        found.put("")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (the server drains and exits), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.asynccontextmanager
async def running_gateway(backends: list[str], tracer_provider: Any = None) -> AsyncIterator[str]:
    """The gateway app on a free loopback port of this event loop, once a backend is SERVING; yields its URL."""
    app = create_app(GatewayConfig(port=0, backends=tuple(backends)), tracer_provider)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert await app[POOL].wait_serving(30.0), "no backend became SERVING"
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus exposition keyed by (sample name, labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
