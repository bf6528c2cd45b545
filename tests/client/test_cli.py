"""The `weir` command: client subcommands against the test server, and `weir up` running both processes."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from weir_client import WeirClient

pytestmark = pytest.mark.slow


def _weir(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir_client.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_prints_the_completion(weir_target: str) -> None:
    result = _weir(
        "generate",
        "What is the capital of France?",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--target",
        weir_target,
        "-v",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "prompt" in result.stderr and "completion" in result.stderr


def test_generate_reports_server_errors_without_a_traceback(weir_target: str) -> None:
    result = _weir("generate", "Hi", "--temperature", "9", "--target", weir_target)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "temperature" in result.stderr
    assert "Traceback" not in result.stderr


def test_embed_prints_one_vector_per_text(weir_target: str) -> None:
    result = _weir("embed", "one", "two", "--dimensions", "8", "--target", weir_target)
    assert result.returncode == 0, result.stderr
    vectors = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(vectors) == 2 and all(len(v) == 8 for v in vectors)


def test_tokenize_prints_ids_tokens_and_offsets(weir_target: str) -> None:
    result = _weir("tokenize", "hello world", "--offsets", "--target", weir_target)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "token_ids": [28120, 905],
        "tokens": ["hello", " world"],
        "offsets": [[0, 5], [5, 11]],
    }


def test_models_prints_a_table(weir_target: str) -> None:
    result = _weir("models", "--target", weir_target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "TASK"]
    assert any(line.startswith("smollm2-135m-instruct") and "generate" in line for line in lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def test_up_starts_server_and_gateway_and_stops_both_on_sigterm() -> None:
    with_gateway = importlib.util.find_spec("weir_gateway.cli") is not None
    grpc_port, http_port = _free_port(), _free_port()
    command = [
        sys.executable,
        "-m",
        "weir_client.cli",
        "up",
        "--port",
        str(grpc_port),
        "--gateway-port",
        str(http_port),
        "--model",
        "none",
        "--embed-model",
        "none",
        "--drain-timeout",
        "1",
    ]
    if not with_gateway:
        command.append("--no-gateway")
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        with WeirClient(f"127.0.0.1:{grpc_port}") as client:
            client.wait_until_ready(timeout=120)
        if with_gateway:
            assert _wait_for_port(http_port, timeout=60), "the gateway never listened"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not _wait_for_port(grpc_port, timeout=0.5)
        assert not with_gateway or not _wait_for_port(http_port, timeout=0.5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
