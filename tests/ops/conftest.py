"""Operations fixtures: an OTLP receiver, and one traced, metered server subprocess of the tiny random Llama."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_support import CHAT_TEMPLATE, TINY_MODEL_NAME, ServerProcess

SERVER_ARGS = ["--load-format", "dummy", "--max-model-len", "256", "--num-kv-blocks", "128",
               "--metrics-port", "0", "--log-format", "json"]  # fmt: skip


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
def traced_server(tiny_model: Path, receiver: Any, packaged_model_paths) -> Iterator[ServerProcess]:
    """A server exporting spans to `receiver` (flushed every 50 ms) with /metrics on a free port; it generates with
    the tiny model (and a chat template) and embeds with the packaged MiniLM."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"} if receiver else {}
    models = ["--model", str(tiny_model), "--served-model-name", TINY_MODEL_NAME, "--chat-template", CHAT_TEMPLATE,
              "--embed-model", str(packaged_model_paths.minilm_dir)]  # fmt: skip
    server = ServerProcess([*models, *SERVER_ARGS], env=env).start()
    yield server
    server.stop()
