"""Prometheus metrics move with the load: the gateway's /metrics and the server's metrics port, scraped while
requests run and after."""

from __future__ import annotations

import asyncio

import aiohttp
from ops_support import ServerProcess, metric, parse_metrics, running_gateway

COMPLETIONS = "/v1/completions"


async def _scrape(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await reply.text())


async def test_counters_and_histograms_follow_the_requests_sent(traced_server: ServerProcess):
    n = 6
    async with running_gateway([traced_server.target]) as url, aiohttp.ClientSession() as http:
        gateway_metrics, server_metrics = f"{url}/metrics", traced_server.metrics_url
        before_gw, before_srv = await _scrape(http, gateway_metrics), await _scrape(http, server_metrics)

        async def complete(i: int) -> dict:
            body = {"prompt": f"request number {i}", "max_tokens": 4 + i, "temperature": 0}
            async with http.post(url + COMPLETIONS, json=body) as reply:
                assert reply.status == 200, await reply.text()
                return (await reply.json())["usage"]

        load = asyncio.gather(*(complete(i) for i in range(n)))
        during = []
        while not load.done():  # scrape while the requests run: counters only ever grow
            during.append(await _scrape(http, server_metrics))
            await asyncio.sleep(0.02)
        usages = await load
        async with http.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": -1}) as bad:
            assert bad.status == 400
        after_gw, after_srv = await _scrape(http, gateway_metrics), await _scrape(http, server_metrics)

    def delta(name: str, after: dict, before: dict, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    requests = "weir_gateway_http_requests_total"
    assert delta(requests, after_gw, before_gw, route=COMPLETIONS, status="200") == n
    assert delta(requests, after_gw, before_gw, route=COMPLETIONS, status="400") == 1
    assert delta("weir_gateway_http_request_duration_seconds_count", after_gw, before_gw, route=COMPLETIONS) == n + 1
    assert metric(after_gw, "weir_gateway_backend_up", backend=traced_server.target) == 1

    assert delta("weir_requests_total", after_srv, before_srv, method="Generate", code="OK") == n
    prompt, completion = sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages)
    assert delta("weir_request_prompt_tokens_sum", after_srv, before_srv) == prompt
    assert delta("weir_request_generation_tokens_sum", after_srv, before_srv) == completion
    assert delta("weir_request_generation_tokens_count", after_srv, before_srv) == n
    assert delta("weir_time_to_first_token_seconds_count", after_srv, before_srv) == n
    assert delta("weir_request_duration_seconds_count", after_srv, before_srv) == n
    assert delta("weir_inter_token_latency_seconds_count", after_srv, before_srv) <= completion - n
    assert delta("weir_generation_tokens_total", after_srv, before_srv) >= completion
    assert delta("weir_generation_requests_finished_total", after_srv, before_srv) == n

    series = [before_srv, *during, after_srv]
    for name in ("weir_generation_tokens_total", "weir_engine_steps_total", "weir_request_prompt_tokens_count"):
        values = [metric(s, name) for s in series]
        assert values == sorted(values), name
    assert metric(after_srv, "weir_requests_running") == 0 and metric(after_srv, "weir_requests_waiting") == 0
    assert metric(after_srv, "weir_kv_cache_blocks") == 128
    assert metric(after_srv, "weir_model_load_duration_seconds") > 0
