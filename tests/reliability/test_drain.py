"""Graceful drain: on SIGTERM a server (or gateway) under load reports NOT_SERVING, refuses new calls cleanly,
lets every running stream finish, and exits 0; a model that cannot load ends the process with one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from conftest import GatewayProcess, ServerProcess, Tally, terminate

from weir_client import WeirClient, WeirClientError

STREAMS = 6
TOKENS = 120


def _stream_all(target: str, started: threading.Barrier, results: list[object], i: int) -> None:
    with WeirClient(target, timeout=300, max_attempts=1) as client:
        tokens, finish = 0, None
        try:
            for n, chunk in enumerate(client.generate("Tell me a story", max_tokens=TOKENS, ignore_eos=True)):
                if n == 0:
                    started.wait(timeout=120)
                tokens += len(chunk.token_ids)
                finish = chunk.finish_reason or finish
            results[i] = (tokens, finish)
        except WeirClientError as e:
            results[i] = e


def test_sigterm_under_load_finishes_running_streams_refuses_new_calls_and_exits_0(
    spawn_server: Callable[..., ServerProcess],
) -> None:
    tally = Tally("server-sigterm")
    server = spawn_server("--drain-timeout", "120", "--max-num-seqs", "8")
    started = threading.Barrier(STREAMS + 1)
    results: list[object] = [None] * STREAMS
    threads = [threading.Thread(target=_stream_all, args=(server.target, started, results, i)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    started.wait(timeout=120)  # every stream has its first tokens
    tally.sent += STREAMS
    server.process.signal(15)
    time.sleep(0.3)
    with WeirClient(server.target, timeout=10, max_attempts=1) as client:
        health = client.health()
        for _ in range(3):
            tally.sent += 1
            try:
                client.complete("new work", max_tokens=2)
                tally.answered += 1
            except WeirClientError as e:
                assert e.code == grpc.StatusCode.UNAVAILABLE, e
                tally.refused += 1
    for thread in threads:
        thread.join(timeout=300)
    tally.answered += sum(r == (TOKENS, "length") for r in results)
    tally.failed += sum(r != (TOKENS, "length") for r in results)
    code = server.process.wait(timeout=120)
    tally.report()
    assert health == "NOT_SERVING"
    assert results == [(TOKENS, "length")] * STREAMS
    assert tally.refused == 3
    assert code == 0, server.process.log[-2000:]
    assert f"draining: {STREAMS} calls running" in server.process.log


def _sse_stream(url: str, started: threading.Barrier, results: list[object], i: int) -> None:
    body = json.dumps({"prompt": "Tell me a story", "max_tokens": TOKENS, "ignore_eos": True, "stream": True})
    request = urllib.request.Request(f"{url}/v1/completions", body.encode(), {"Content-Type": "application/json"})
    tokens, done = 0, False
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            for n, raw in enumerate(reply):
                line = raw.decode().strip()
                if n == 0:
                    started.wait(timeout=120)
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    tokens += bool(event.get("choices") and event["choices"][0].get("text"))
        results[i] = ("done" if done else "cut", tokens)
    except (urllib.error.URLError, OSError) as e:
        results[i] = e


def test_gateway_sigterm_under_load_finishes_running_streams_and_exits_0(
    spawn_server: Callable[..., ServerProcess], spawn_gateway: Callable[..., GatewayProcess]
) -> None:
    tally = Tally("gateway-sigterm")
    server = spawn_server("--max-num-seqs", "8")
    gateway = spawn_gateway([server.target], "--drain-timeout", "120")
    started = threading.Barrier(STREAMS + 1)
    results: list[object] = [None] * STREAMS
    threads = [threading.Thread(target=_sse_stream, args=(gateway.url, started, results, i)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    started.wait(timeout=120)
    tally.sent += STREAMS
    gateway.process.signal(15)
    time.sleep(0.3)
    tally.sent += 1
    try:
        urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=5)
        tally.answered += 1
    except urllib.error.HTTPError as e:
        assert e.code == 503
        tally.refused += 1
    except (urllib.error.URLError, OSError):
        tally.refused += 1  # the listener is closed: connection refused
    for thread in threads:
        thread.join(timeout=300)
    done = [r for r in results if isinstance(r, tuple) and r[0] == "done"]
    tally.answered += len(done)
    tally.failed += STREAMS - len(done)
    code = gateway.process.wait(timeout=120)
    tally.report()
    assert len(done) == STREAMS, results
    assert tally.refused == 1
    assert code == 0, gateway.process.log[-2000:]


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "weir_client.cli", "serve", "--port", "0", "--embed-model", "none", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_model_that_does_not_exist_exits_1_with_one_clear_line() -> None:
    done = _serve("--model", "/nonexistent/model")
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert errors == [errors[-1]] and "could not load a model" in errors[-1] and "/nonexistent/model" in errors[-1]


def test_model_whose_config_is_broken_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 7}))
    done = _serve("--model", str(tmp_path))
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(errors) == 1 and "could not" in errors[0]


def test_second_signal_ends_the_drain_at_once(spawn_server: Callable[..., ServerProcess]) -> None:
    server = spawn_server("--drain-timeout", "600")
    started = threading.Barrier(2)
    results: list[object] = [None]
    thread = threading.Thread(target=_stream_all, args=(server.target, started, results, 0))
    thread.start()
    started.wait(timeout=120)
    server.process.signal(15)
    time.sleep(0.5)
    began = time.monotonic()
    assert terminate(server.process, timeout=60) == 0
    thread.join(timeout=60)
    assert time.monotonic() - began < 30
    assert isinstance(results[0], WeirClientError) and results[0].code == grpc.StatusCode.UNAVAILABLE
