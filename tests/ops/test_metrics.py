"""Prometheus metrics move with the load: the gateway's /metrics and the server's metrics port, scraped while
requests run and after."""

from __future__ import annotations

import asyncio

import aiohttp
from ops_support import TINY_MODEL_NAME, ServerProcess, metric, parse_metrics, running_gateway

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


async def test_vllm_named_series_carry_the_same_values_as_weirs_own(traced_server: ServerProcess):
    async with running_gateway([traced_server.target]) as url, aiohttp.ClientSession() as http:
        for i in range(3):
            body = {"model": TINY_MODEL_NAME, "prompt": f"shared prefix, request {i}", "max_tokens": 4 + i}
            async with http.post(url + COMPLETIONS, json=body) as reply:
                assert reply.status == 200, await reply.text()
        server, gateway = await _scrape(http, traced_server.metrics_url), await _scrape(http, f"{url}/metrics")

    weir, vllm = {"model": TINY_MODEL_NAME}, {"model_name": TINY_MODEL_NAME, "engine": "0"}
    same = {
        "weir_requests_running": ["vllm:num_requests_running"],
        "weir_requests_waiting": ["vllm:num_requests_waiting"],
        "weir_kv_cache_usage_ratio": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        "weir_preemptions_total": ["vllm:num_preemptions_total"],
        "weir_generation_tokens_total": ["vllm:generation_tokens_total"],
        "weir_prompt_tokens_total": ["vllm:prompt_tokens_total"],
        "weir_prefix_cache_queried_tokens_total": ["vllm:prefix_cache_queries_total"],
        "weir_prefix_cache_hit_tokens_total": ["vllm:prefix_cache_hits_total"],
        "weir_time_to_first_token_seconds_count": ["vllm:time_to_first_token_seconds_count"],
        "weir_inter_token_latency_seconds_sum": [
            "vllm:inter_token_latency_seconds_sum", "vllm:time_per_output_token_seconds_sum",
        ],
        "weir_request_duration_seconds_count": ["vllm:e2e_request_latency_seconds_count"],
        "weir_request_queue_duration_seconds_count": ["vllm:request_queue_time_seconds_count"],
        "weir_request_prompt_tokens_sum": ["vllm:request_prompt_tokens_sum"],
        "weir_request_generation_tokens_sum": ["vllm:request_generation_tokens_sum"],
        "weir_generation_requests_finished_total": ["vllm:request_success_total"],
    }  # fmt: skip
    for name, copies in same.items():
        for copy in copies:
            assert metric(server, copy, **vllm) == metric(server, name, **weir), (copy, name)
    assert metric(server, "vllm:prompt_tokens_total", **vllm) > 0
    assert metric(server, "vllm:request_generation_tokens_bucket", le="+Inf", **vllm) == metric(
        server, "weir_request_generation_tokens_count", **weir
    )
    reasons = {dict(labels)["finished_reason"] for n, labels in server if n == "vllm:request_success_total"}
    assert reasons and reasons <= {"stop", "length", "abort", "error"}
    for samples in (server, gateway):  # the process's own series, on each registry
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
            assert any(n == name for n, _ in samples), name
        assert any(n.startswith("python_gc_") for n, _ in samples)
