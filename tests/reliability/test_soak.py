"""Soak: mixed streaming and unary calls through the gateway at 2x the engine's capacity, with 20% of the requests
coming from clients that hang up mid-stream. Every other request ends with its answer or a 429; none hangs, none
gets a 5xx; afterwards nothing runs, the KV block pool is full again and memory is back to its baseline.

The duration is `WEIR_SOAK_SECONDS` (default 60): the two soaks of the bar (plain, and with disconnecting
clients) run at once, in one 60-second run, which keeps CI time in check without lowering the bar."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from conftest import SMALL_MAX_NUM_SEQS, SMALL_MAX_WAITING, InProcessServer, Launcher, Tally

SOAK_SECONDS = float(os.environ.get("WEIR_SOAK_SECONDS", "60"))
CLIENTS = 2 * (SMALL_MAX_NUM_SEQS + SMALL_MAX_WAITING)  # 2x what the engine admits
DISCONNECT_SHARE = 0.2
REQUEST_TIMEOUT_S = 120  # a request still open after this long counts as hung
MEMORY_SLACK_BYTES = 64 * 2**20
PROMPTS = ["Tell me about the sea.", "What is 2 + 2?", "Write a haiku about rain.", "Name three colours.",
           "Why is the sky blue?", "Give me a short greeting.", "Describe a cat in one sentence."]  # fmt: skip


@pytest.fixture(scope="module")
def soak_gateway(small_server: InProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    launcher = Launcher(Path(tmp_path_factory.mktemp("soak")))
    try:
        gateway = launcher.gateway([small_server.target], "--log-level", "warning")
        yield gateway.url, psutil.Process(gateway.process.popen.pid)
    finally:
        launcher.close()


async def _stream(session: aiohttp.ClientSession, url: str, body: dict, hang_up_after: int | None) -> str:
    """The outcome of one streamed chat completion: answered, refused, disconnected, or failed:<why>."""
    body = body | {"stream": True}
    async with session.post(f"{url}/v1/chat/completions", json=body) as reply:
        if reply.status == 429:
            return "refused"
        if reply.status != 200:
            return f"failed:http {reply.status}"
        events, finished = 0, False
        async for raw in reply.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "answered" if finished else "failed:no finish_reason"
            event = json.loads(line[6:])
            if "error" in event:
                return f"failed:event {event['error'].get('code')}"
            events += 1
            finished = finished or any(c.get("finish_reason") for c in event.get("choices", ()))
            if hang_up_after is not None and events >= hang_up_after:
                reply.close()  # the client goes away mid-stream
                return "disconnected"
        return "failed:stream cut"


async def _unary(session: aiohttp.ClientSession, url: str, body: dict) -> str:
    body = {"prompt": body["messages"][0]["content"], "max_tokens": body["max_tokens"]}
    async with session.post(f"{url}/v1/completions", json=body) as reply:
        if reply.status == 429:
            return "refused" if reply.headers.get("Retry-After") else "failed:429 without Retry-After"
        if reply.status != 200:
            return f"failed:http {reply.status}"
        completion = await reply.json()
        ok = completion["choices"][0]["finish_reason"] in ("stop", "length") and completion["usage"]
        return "answered" if ok else "failed:bad body"


async def _client(url: str, seconds: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": rng.randint(4, 24)}
            leaves = rng.random() < DISCONNECT_SHARE
            tally.sent += 1
            try:
                if leaves:
                    outcome = await _stream(session, url, body | {"max_tokens": 64}, hang_up_after=rng.randint(1, 3))
                elif rng.random() < 0.5:
                    outcome = await _stream(session, url, body, hang_up_after=None)
                else:
                    outcome = await _unary(session, url, body)
            except TimeoutError:
                outcome = "hung"
            except aiohttp.ClientError as e:
                outcome = f"failed:{type(e).__name__}"
            if outcome.startswith("failed:"):
                tally.failed += 1
                tally.note(outcome)
            else:
                setattr(tally, outcome, getattr(tally, outcome) + 1)
            if outcome == "refused":
                await asyncio.sleep(rng.uniform(0.25, 1.0))  # retry soon: the load stays at twice capacity


def _rss(process: psutil.Process) -> int:
    return int(process.memory_info().rss)


async def _load(url: str, seconds: float, tally: Tally) -> None:
    await asyncio.gather(*(_client(url, seconds, tally, seed) for seed in range(CLIENTS)))


async def test_soak_at_twice_capacity_with_disconnecting_clients(small_server: InProcessServer, soak_gateway) -> None:
    url, gateway_process = soak_gateway
    this_process = psutil.Process()
    await _load(url, 8, Tally("soak-warmup"))  # allocator pools, caches and connections reach their steady size
    assert small_server.wait_engine_idle(timeout=60).num_running == 0
    gc.collect()
    baseline = {"server": _rss(this_process), "gateway": _rss(gateway_process)}
    preemptions_before = small_server.engine.stats().num_preemptions

    tally = Tally("soak")
    started = time.monotonic()
    await _load(url, SOAK_SECONDS, tally)
    elapsed = time.monotonic() - started

    stats = small_server.wait_engine_idle(timeout=60)
    await asyncio.sleep(1.0)
    gc.collect()
    final = {"server": _rss(this_process), "gateway": _rss(gateway_process)}
    tally.info["seconds"] = f"{elapsed:.0f}"
    tally.info["clients"] = str(CLIENTS)
    tally.info["preemptions"] = str(stats.num_preemptions - preemptions_before)
    for name in baseline:
        tally.info[f"{name}_rss_mib"] = f"{baseline[name] / 2**20:.0f}->{final[name] / 2**20:.0f}"
    tally.report()

    assert tally.failed == 0 and tally.hung == 0, tally.other
    assert tally.answered + tally.refused + tally.disconnected == tally.sent
    assert tally.answered > 0 and tally.refused > 0 and tally.disconnected > 0  # it really was overloaded
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks  # no KV block leaked
    for name in baseline:
        assert final[name] <= baseline[name] * 1.1 + MEMORY_SLACK_BYTES, (name, baseline[name], final[name])
