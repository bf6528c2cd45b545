"""The Grafana dashboard (deploy/grafana/dashboards/weir.json) against real metrics: a real Weir server (the tiny
random Llama: the metrics, not the text, are under test) and the real gateway answer a few requests, then every PromQL
expression of the dashboard is run.

Two modes, one test each: with a `prometheus` binary (CI: `apt-get install -y --no-install-recommends prometheus`)
a real Prometheus scrapes both with deploy/prometheus.yml's jobs and answers each expression through its HTTP API;
without it that test is skipped (saying so) and the other still checks that every metric an expression names is in
the scraped expositions."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from ops_support import CHAT_TEMPLATE, REPO, ServerProcess, running_gateway
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "weir.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
RATE_WINDOW = "30s"  # what $__rate_interval stands for here: Prometheus scrapes every second in these tests
# Panels that must show numbers after the requests below (the others may be NaN: a quantile of nothing, 0/0).
CORE_PANELS = {
    "Backends up", "Requests finished / s by finish reason", "Gateway HTTP requests / s", "Server RPCs / s",
    "Time to first token", "Inter-token latency", "End-to-end request latency", "Tokens / s", "KV cache usage",
    "Running and waiting", "Preemptions / s", "Prefix cache hit rate", "CPU", "Resident memory",
}  # fmt: skip
# What dashboards and autoscalers written for vLLM query: they must answer from a Weir server too.
VLLM_QUERIES = [
    "sum by (finished_reason) (rate(vllm:request_success_total[30s]))",
    'histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{model_name=~".+"}[30s])))',
    "histogram_quantile(0.9, sum by (le) (rate(vllm:time_per_output_token_seconds_bucket[30s])))",
    "histogram_quantile(0.9, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[30s])))",
    "histogram_quantile(0.5, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[30s])))",
    "rate(vllm:prompt_tokens_total[30s])", "rate(vllm:generation_tokens_total[30s])",
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc",
    "rate(vllm:num_preemptions_total[30s])",
    "rate(vllm:prefix_cache_hits_total[30s]) / rate(vllm:prefix_cache_queries_total[30s])",
    "rate(vllm:request_prompt_tokens_sum[30s])", "rate(vllm:request_generation_tokens_count[30s])",
]  # fmt: skip
SERVER_ARGS = ["--load-format", "dummy", "--chat-template", CHAT_TEMPLATE, "--embed-model", "none", "--max-model-len",
               "512", "--num-kv-blocks", "64", "--metrics-port", "0", "--log-format", "json"]  # fmt: skip
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "offset", "bool", "le",
}  # fmt: skip


def _panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")]


def _expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, Grafana's variables given the values an "All" view has."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:  # label_values(METRIC, LABEL): the metric must exist
        if m := re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"]):
            found.append((f"${variable['name']}", m[1]))
    return [(title, expr.replace("$model", ".*").replace("$__rate_interval", RATE_WINDOW)) for title, expr in found]


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, grouping and functions left out)."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end() :].lstrip().startswith("(") or m[0] in PROMQL_WORDS:
            continue
        names.add(m[0])
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real_server(tiny_model: Path) -> Iterator[ServerProcess]:
    """`weir serve` with the tiny model and its metrics port."""
    server = ServerProcess(["--model", str(tiny_model), *SERVER_ARGS]).start(timeout_s=300)
    yield server
    server.stop()


async def _load(http: aiohttp.ClientSession, url: str) -> None:
    """Requests every panel has something to show for: repeated prompts (prefix-cache hits), a stream, a chat."""
    shared = "You are a careful assistant. Answer in one short sentence. " * 4
    bodies = [{"prompt": shared + f"Question {i}: what is {i} plus {i}?", "max_tokens": 8} for i in range(4)]
    completions = [http.post(f"{url}/v1/completions", json=b | {"temperature": 0}) for b in bodies]
    chat = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "stream": True}
    for call in [*completions, http.post(f"{url}/v1/chat/completions", json=chat)]:
        async with call as reply:
            assert reply.status == 200, await reply.text()
            await reply.read()


async def _scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as reply:
        assert reply.status == 200
        return await reply.text()


def test_dashboard_and_grafana_provisioning_agree():
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "weir.yaml").read_text())["datasources"]
    prometheus = next(d for d in datasources if d["type"] == "prometheus")
    for panel in _panels():
        assert panel["datasource"]["uid"] == prometheus["uid"], panel["title"]
        assert all(t["datasource"]["uid"] == prometheus["uid"] for t in panel["targets"]), panel["title"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "weir.yaml").read_text())["providers"]
    grafana = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


async def test_every_metric_the_dashboard_reads_is_exposed(real_server: ServerProcess):
    """The mode that needs no Prometheus: every metric name in every expression is in a real scrape."""
    async with running_gateway([real_server.target]) as url, aiohttp.ClientSession() as http:
        await _load(http, url)
        texts = [await _scrape(http, real_server.metrics_url), await _scrape(http, f"{url}/metrics")]
    exposed = {s.name for text in texts for f in text_string_to_metric_families(text) for s in f.samples}
    missing = {(title, name) for title, expr in _expressions() for name in _metric_names(expr) - exposed}
    assert not missing
    for expr in VLLM_QUERIES:
        assert _metric_names(expr) <= exposed, expr


class Prometheus:
    """A real Prometheus scraping the gateway and the server every second, with deploy/prometheus.yml's jobs."""

    def __init__(self, binary: str, directory: Path, targets: dict[str, list[str]]) -> None:
        config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{_free_port()}"
        command = [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
                   f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        async with http.get(f"{self.url}/api/v1/query", params={"query": expr}) as reply:
            answer = await reply.json()
        assert answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    async def wait_for_scrapes(self, http: aiohttp.ClientSession, jobs: set[str], after: float) -> None:
        """Until every target of `jobs` is up and was scraped since `after` (a time.time())."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read() if self.process.stderr else ""
            try:
                async with http.get(f"{self.url}/api/v1/targets") as reply:
                    targets = (await reply.json())["data"]["activeTargets"]
            except aiohttp.ClientConnectionError:
                targets = []
            fresh = [t for t in targets if t["health"] == "up" and _epoch(t["lastScrape"]) > after]
            if {t["labels"]["job"] for t in fresh} >= jobs and len(fresh) == len(targets):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"Prometheus did not scrape {jobs}: {targets}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    # Prometheus writes nanoseconds; Python's parser takes at most microseconds.
    trimmed = re.sub(r"(\.\d{6})\d*", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Starts Prometheus on given targets (stopped after the test); skips the test where it is not installed."""
    binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        pytest.skip("no prometheus binary: only the metric names were checked (apt-get install prometheus)")
    started: list[Prometheus] = []

    def start(targets: dict[str, list[str]]) -> Prometheus:
        started.append(Prometheus(binary, tmp_path, targets))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


async def test_every_dashboard_query_answers_in_a_real_prometheus(real_server: ServerProcess, prometheus_for):
    """The full mode: Prometheus scrapes the real server and gateway, and answers every dashboard expression."""
    server_target = real_server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    async with running_gateway([real_server.target]) as url, aiohttp.ClientSession() as http:
        jobs = {"weir-gateway": [url.removeprefix("http://")], "weir-server": [server_target]}
        # Prometheus sees a series from its first scrape, so a rate needs one before the load: a first load makes
        # every labelled series exist, a scrape takes their values, and the second load moves them.
        await _load(http, url)
        prometheus = prometheus_for(jobs)
        await prometheus.wait_for_scrapes(http, set(jobs), after=time.time())
        await _load(http, url)
        loaded = time.time()
        for _ in range(2):  # two scrapes after the load: rates over the window see it
            await prometheus.wait_for_scrapes(http, set(jobs), after=loaded)
            loaded = time.time()
        empty, not_numbers = [], []
        for title, expr in _expressions():
            result = await prometheus.query(http, expr)
            if not result:
                empty.append((title, expr))
            elif title in CORE_PANELS and not any(math.isfinite(float(r["value"][1])) for r in result):
                not_numbers.append((title, expr, result))
        for expr in VLLM_QUERIES:
            if not await prometheus.query(http, expr):
                empty.append(("vLLM", expr))
    assert not empty
    assert not not_numbers
