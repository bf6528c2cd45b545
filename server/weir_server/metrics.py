"""Prometheus metrics of a Weir server (`weir_` names, units in the name) and the small HTTP port serving them.

Per-request histograms are observed by the API layer; engine gauges and counters are read from each engine's
`stats()` at scrape time, so the engine knows nothing of Prometheus. Without prometheus-client, `create_metrics`
returns None and the server runs without metrics.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from weir_server.api.model_registry import ServedModels
    from weir_server.api.observer import GenerationRecord

logger = logging.getLogger(__name__)

# Seconds: from a few milliseconds (tiny models, GPUs) to minutes (long generations on CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


def prometheus_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


class ServerMetrics:
    """One registry per server (so several servers can share a process in tests) holding every Weir metric."""

    def __init__(self, models: ServedModels) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "weir_requests", "RPCs handled, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.finished = Counter(
            "weir_generation_requests_finished", "Generate calls that reached the engine, by finish reason",
            ["model", "finish_reason"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "weir_time_to_first_token_seconds", "From the Generate call's arrival to its first token",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            "weir_inter_token_latency_seconds", "Gap between consecutive tokens of a choice",
            ["model"], buckets=TOKEN_GAP_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "weir_request_duration_seconds", "From a Generate call's arrival to its last output",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "weir_request_queue_duration_seconds", "Time a request waited before the engine first scheduled it",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Histogram(
            "weir_request_prompt_tokens", "Prompt tokens per Generate call", ["model"], buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.generation_tokens = Histogram(
            "weir_request_generation_tokens", "Generated tokens per Generate call (all choices)", ["model"],
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(models))

    def observe_rpc(self, method: str, code: str) -> None:
        self.requests.labels(method, code).inc()

    def observe_generation(self, record: GenerationRecord) -> None:
        """Histograms and counters of one Generate call that reached the engine."""
        model = record.model
        for reason in record.finish_reasons or ("cancelled",):
            self.finished.labels(model, reason).inc()
        if record.first_token is not None:
            self.ttft.labels(model).observe(max(0.0, record.first_token - record.received))
        for gap in record.token_gaps:
            self.inter_token.labels(model).observe(gap)
        if record.scheduled is not None and record.arrival is not None:
            self.queue.labels(model).observe(max(0.0, record.scheduled - record.arrival))
        if not record.complete:
            return  # token counts of an abandoned request would skew the distributions
        self.e2e.labels(model).observe(max(0.0, record.finished - record.received))
        self.prompt_tokens.labels(model).observe(record.prompt_tokens)
        self.generation_tokens.labels(model).observe(record.completion_tokens)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what /metrics answers)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCollector:
    """Reads every generation engine's stats and every model's load time at scrape time."""

    def __init__(self, models: ServedModels) -> None:
        self.models = models

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, doc: str, labels: Iterable[str] = ("model",)) -> Any:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        def counter(name: str, doc: str) -> Any:
            return CounterMetricFamily(name, doc, labels=["model"])

        running = gauge("weir_requests_running", "Sequences holding KV blocks")
        waiting = gauge("weir_requests_waiting", "Sequences queued (new or preempted)")
        usage = gauge("weir_kv_cache_usage_ratio", "Fraction of KV blocks held by sequences")
        blocks = gauge("weir_kv_cache_blocks", "KV blocks allocated")
        hit_rate = gauge("weir_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache / looked up")
        queried = counter("weir_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache")
        hits = counter("weir_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache")
        preemptions = counter("weir_preemptions", "Sequences preempted (their KV recomputed later)")
        generated = counter("weir_generation_tokens", "Tokens generated")
        steps = counter("weir_engine_steps", "Engine iterations run")
        load = gauge("weir_model_load_duration_seconds", "Seconds it took to load each model", ("model", "task"))
        for model in self.models.models():
            load.add_metric([model.id, model.task], model.load_duration_s)
            if model.generator is None:
                continue
            s = model.generator.stats()
            labels = [model.id]
            running.add_metric(labels, s.num_running)
            waiting.add_metric(labels, s.num_waiting)
            usage.add_metric(labels, s.kv_cache_usage)
            blocks.add_metric(labels, s.num_total_blocks)
            hit_rate.add_metric(labels, s.prefix_cache_hit_rate)
            queried.add_metric(labels, s.prefix_cache_queried_tokens)
            hits.add_metric(labels, s.prefix_cache_hit_tokens)
            preemptions.add_metric(labels, s.num_preemptions)
            generated.add_metric(labels, s.num_generated_tokens)
            steps.add_metric(labels, s.num_steps)
        yield from (running, waiting, usage, blocks, hit_rate, queried, hits, preemptions, generated, steps, load)


class MetricsHttpServer:
    """prometheus-client's threaded HTTP server answering /metrics from one registry."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port: int = self._httpd.server_port
        logger.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def create_metrics(models: ServedModels) -> ServerMetrics | None:
    """Metrics for a server, or None (with one warning) when prometheus-client is not installed."""
    if not prometheus_available():
        logger.warning("prometheus-client is not installed; metrics are off")
        return None
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # the `_created` series only double the scrape size
    return ServerMetrics(models)
