"""Operations fixtures: a tiny random Llama on disk, an OTLP receiver, and one traced, metered server subprocess."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_support import ServerProcess, make_tiny_model

SERVER_ARGS = ["--load-format", "dummy", "--embed-model", "none", "--max-model-len", "256", "--num-kv-blocks", "128",
               "--metrics-port", "0", "--log-format", "json"]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, packaged_model_paths) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ops") / "tiny-llama", packaged_model_paths.minilm_dir)


@pytest.fixture(scope="session")
def receiver() -> Iterator[Any]:
    """An OTLP receiver, or None where opentelemetry is not installed (the metrics tests still run)."""
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        yield None
        return
    from otlp_receiver import otlp_receiver

    with otlp_receiver() as r:
        yield r


@pytest.fixture(scope="session")
def traced_server(tiny_model: Path, receiver: Any) -> Iterator[ServerProcess]:
    """A server exporting spans to `receiver` (flushed every 50 ms) with /metrics on a free port."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"} if receiver else {}
    server = ServerProcess(["--model", str(tiny_model), *SERVER_ARGS], env=env).start()
    yield server
    server.stop()
