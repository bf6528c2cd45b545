"""The OpenAI-compatible driver against a small fake SSE server on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from weir_bench.openai_driver import OpenAIDriver, api_base

# Async tests run on the session's event loop, where pyproject puts async fixtures too.
session_loop = pytest.mark.asyncio(loop_scope="session")
BODIES = web.AppKey("bodies", list)


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[BODIES].append(body)
    if body["model"] == "missing":
        return web.json_response({"error": {"message": "no such model"}}, status=404)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(body["max_tokens"]):
        chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await resp.write(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n')
    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
    await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _models(_: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": "tiny", "meta": {"n_vocab": 321}}]})


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[str, web.Application]]:
    app = web.Application()
    app[BODIES] = []
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1", app
    await runner.cleanup()


def test_api_base_accepts_urls_with_or_without_v1():
    assert api_base("http://h:1/v1/") == api_base("http://h:1") == "http://h:1"


@session_loop
async def test_streams_count_text_chunks_and_send_token_ids_with_eos_ignored(fake_server):
    url, app = fake_server
    driver = OpenAIDriver(url)
    try:
        assert await driver.ready()
        assert await driver.resolve_model() == "tiny"
        assert await driver.vocab_size() == 321
        timing = await driver.generate([5, 6, 7], 4)
    finally:
        await driver.close()
    assert timing.ok and timing.error is None
    assert len(timing.events) == 4 and timing.num_output_tokens == 4
    sent = app[BODIES][0]
    assert sent["prompt"] == [5, 6, 7] and sent["stream"] is True
    assert sent["ignore_eos"] is True and sent["min_tokens"] == sent["max_tokens"] == 4


@session_loop
async def test_http_error_becomes_a_failed_timing(fake_server):
    url, _ = fake_server
    driver = OpenAIDriver(url, model="missing")
    try:
        timing = await driver.generate([1], 2)
    finally:
        await driver.close()
    assert not timing.ok and "404" in (timing.error or "")


@session_loop
async def test_unreachable_server_becomes_a_failed_timing():
    driver = OpenAIDriver("http://127.0.0.1:9", model="m", timeout_s=5)
    try:
        timing = await driver.generate([1], 2)
        assert not await driver.ready()
    finally:
        await driver.close()
    assert not timing.ok and timing.error
