"""Faults and overload: a backend killed mid-stream, an engine step that raises, deadlines, clients that leave,
and a full queue. Every request ends with its answer or a clear status, and the engine frees what it held."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from conftest import SMALL_MAX_NUM_SEQS, SMALL_MAX_WAITING, GatewayProcess, InProcessServer, ServerProcess, Tally

from weir_client import WeirClient, WeirClientError

TOKENS = 150


def _post(url: str, body: dict[str, Any], timeout: float = 300, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def _completion(url: str, started: threading.Barrier | None, stream: bool, max_tokens: int) -> tuple[str, int]:
    """("done", tokens) for a full answer, else ("http <status>" | "event <code>", tokens so far)."""
    body: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    if started is not None and not stream:
        started.wait(timeout=120)
    try:
        with _post(f"{url}/v1/completions", body) as reply:
            if not stream:
                return "done", json.load(reply)["usage"]["completion_tokens"]
            tokens = 0
            for n, raw in enumerate(reply):
                line = raw.decode().strip()
                if n == 0 and started is not None:
                    started.wait(timeout=120)
                if line == "data: [DONE]":
                    return "done", tokens
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return f"event {event['error']['code']}", tokens
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            return "cut", tokens
    except urllib.error.HTTPError as e:
        return f"http {e.code}", 0


def test_killing_one_backend_mid_stream_fails_only_its_requests(
    spawn_server: Callable[..., ServerProcess], spawn_gateway: Callable[..., GatewayProcess]
) -> None:
    tally = Tally("backend-killed")
    # Cores on threads, as when this test was written: with core processes (a CPU server's default since) one CI run
    # saw 3 of the 4 requests expected on the killed server fail, not 4 (why was not found); thread cores passed it.
    servers = [spawn_server("--max-num-seqs", "8", "--engine-core", "thread") for _ in range(2)]
    gateway = spawn_gateway([s.target for s in servers], "--routing", "least-load")
    kinds = [True] * 6 + [False] * 2  # six streams, two unary calls, spread 4 + 4 by least-outstanding
    started = threading.Barrier(len(kinds) + 1)
    results: list[tuple[str, int]] = [("none", 0)] * len(kinds)

    def run(i: int) -> None:
        results[i] = _completion(gateway.url, started, kinds[i], TOKENS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
    for i, thread in enumerate(threads):
        thread.start()
        time.sleep(0.05 * i)  # in order, so the gateway sees each one's predecessors outstanding
    started.wait(timeout=120)
    time.sleep(0.5)  # the unary calls are running too
    servers[0].process.popen.kill()
    for thread in threads:
        thread.join(timeout=300)
    tally.sent = len(kinds)
    tally.answered = sum(r == ("done", TOKENS) for r in results)
    failures = [r for r in results if r[0] != "done"]
    tally.failed = len(failures)
    # Later requests all succeed on the surviving backend.
    later = [_completion(gateway.url, None, i % 2 == 0, 8) for i in range(10)]
    tally.sent += len(later)
    tally.answered += sum(r == ("done", 8) for r in later)
    tally.report()
    assert len(failures) == len(kinds) // 2, results
    assert all(r[0] in ("event backend_unavailable", "http 503") for r in failures), failures
    assert later == [("done", 8)] * 10


@pytest.fixture
def engine_idle(small_server: InProcessServer) -> Iterator[InProcessServer]:
    """The small server, checked idle with every KV block free after the test."""
    yield small_server
    stats = small_server.wait_engine_idle(timeout=30)
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks


def test_engine_step_fault_fails_only_that_steps_requests_and_the_engine_keeps_serving(
    engine_idle: InProcessServer,
) -> None:
    tally = Tally("step-fault")
    runner = engine_idle.engine.client.core.runner
    real_execute = runner.execute
    calls = {"n": 0}

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real_execute(*args, **kwargs)

    runner.execute = failing_once
    try:
        with WeirClient(engine_idle.target, timeout=60, max_attempts=1) as client:
            tally.sent += 1
            with pytest.raises(WeirClientError) as failed:
                client.complete("Hello", max_tokens=4)
            tally.failed += 1
            for _ in range(3):
                tally.sent += 1
                assert client.complete("Hello", max_tokens=4).choices[0].usage.completion_tokens == 4
                tally.answered += 1
    finally:
        del runner.execute
    tally.report()
    assert failed.value.code == grpc.StatusCode.INTERNAL and "injected fault" in failed.value.message


def test_client_deadline_cancels_the_request_in_the_engine(engine_idle: InProcessServer) -> None:
    with WeirClient(engine_idle.target, max_attempts=1) as client:
        began = time.monotonic()
        with pytest.raises(WeirClientError) as late:
            client.complete("Count to a thousand", max_tokens=400, ignore_eos=True, timeout=1.0)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - began < 3
    stats = engine_idle.wait_engine_idle(timeout=2)  # aborted within a step, not after 400 tokens
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_client_leaving_mid_stream_frees_its_kv_blocks_at_once(engine_idle: InProcessServer) -> None:
    with WeirClient(engine_idle.target, timeout=60, max_attempts=1) as client:
        for n, _ in enumerate(client.generate("Count to a thousand", max_tokens=400, ignore_eos=True)):
            if n == 2:
                assert engine_idle.engine.stats().num_running == 1
                break
    stats = engine_idle.wait_engine_idle(timeout=2)
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_full_queue_refuses_at_once_with_a_retry_hint_but_validates_first(
    engine_idle: InProcessServer, spawn_gateway: Callable[..., GatewayProcess]
) -> None:
    tally = Tally("queue-full")
    capacity = SMALL_MAX_NUM_SEQS + SMALL_MAX_WAITING
    gateway = spawn_gateway([engine_idle.target])
    client = WeirClient(engine_idle.target, timeout=120, max_attempts=1)
    streams = [client.generate("Fill the queue", max_tokens=400, ignore_eos=True) for _ in range(capacity)]
    # Wait on the engine, not on next(stream): the server admits them in any order, a waiting one yields only
    # after a running one ends, and each ends ~190 tokens (the tiny KV pool) after it starts.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every request admitted: running + waiting (preempted ones wait again)
        stats = engine_idle.engine.stats()
        if stats.num_running + stats.num_waiting >= capacity:
            break
        time.sleep(0.02)
    tally.sent += capacity
    try:
        began = time.monotonic()
        with pytest.raises(WeirClientError) as full:
            client.complete("one more", max_tokens=4)
        refused_in = time.monotonic() - began
        tally.sent += 1
        tally.refused += 1
        with pytest.raises(WeirClientError) as invalid:
            client.complete("bad", max_tokens=4, n=99)
        tally.sent += 1
        tally.failed += 1
        with pytest.raises(urllib.error.HTTPError) as http_full:
            _post(f"{gateway.url}/v1/completions", {"prompt": "one more", "max_tokens": 4}, timeout=30)
        tally.sent += 1
        tally.refused += 1
    finally:
        for stream in streams:
            stream.close()  # type: ignore[attr-defined]
        client.close()
    tally.disconnected += capacity
    tally.report()
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and full.value.retry_after and refused_in < 1
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT and invalid.value.field == "sampling_params.n"
    assert http_full.value.code == 429 and int(http_full.value.headers["Retry-After"]) >= 1


def test_gateway_request_timeout_reaches_the_engine(
    engine_idle: InProcessServer, spawn_gateway: Callable[..., GatewayProcess]
) -> None:
    gateway = spawn_gateway([engine_idle.target])
    body = {"prompt": "Count to a thousand", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(urllib.error.HTTPError) as late:
        _post(f"{gateway.url}/v1/completions", body, headers={"X-Request-Timeout": "1"})
    assert late.value.code == 504
    stats = engine_idle.wait_engine_idle(timeout=2)
    assert stats.num_running == 0


def test_kv_exhaustion_preempts_and_every_request_still_completes(engine_idle: InProcessServer) -> None:
    """Four 140-token sequences need three times the 12 blocks the small server has: they take turns."""
    tally = Tally("kv-exhaustion")
    before = engine_idle.engine.stats().num_preemptions
    results: list[object] = [None] * SMALL_MAX_NUM_SEQS

    def run(i: int) -> None:
        with WeirClient(engine_idle.target, timeout=300, max_attempts=1) as client:
            try:
                results[i] = client.complete(f"Story number {i}: once upon a time", max_tokens=100, ignore_eos=True)
            except WeirClientError as e:
                results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SMALL_MAX_NUM_SEQS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    tally.sent = len(results)
    done = [r for r in results if not isinstance(r, WeirClientError) and r is not None]
    tally.answered = sum(r.choices[0].usage.completion_tokens == 100 for r in done)  # type: ignore[union-attr]
    tally.failed = tally.sent - tally.answered
    tally.info["preemptions"] = str(engine_idle.engine.stats().num_preemptions - before)
    tally.report()
    assert tally.answered == tally.sent, results
    assert engine_idle.engine.stats().num_preemptions > before
