"""Prometheus metrics of a Weir server (`weir_` names, units in the name), the same values under the `vllm:`
names that dashboards and autoscalers already query, and the small HTTP port serving them.

Per-request histograms are observed by the API layer; engine gauges and counters are read from each engine's
`stats()` at scrape time, so the engine knows nothing of Prometheus. The `vllm:` series are copies made at scrape
time from the same values (nothing more is counted per request). Without prometheus-client, `create_metrics`
returns None and the server runs without metrics.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

if TYPE_CHECKING:
    from weir_server.api.model_registry import ServedModels
    from weir_server.api.observer import GenerationRecord
    from weir_server.config import ServerConfig
    from weir_server.engine.stats import EngineStats

logger = logging.getLogger(__name__)

# Seconds: from a few milliseconds (tiny models, GPUs) to minutes (long generations on CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)

# vLLM's labels: `model_name`, and `engine` (the engine index of a data-parallel group; Weir runs one per model).
VLLM_ENGINE = "0"
# vLLM's finished_reason values (stop, length, abort, error) for Weir's finish reasons.
VLLM_FINISHED_REASONS = {"stop_sequence": "stop", "cancelled": "abort"}
# (vLLM name, Weir metric attribute, help): Weir's per-request series copied under vLLM's names at scrape time.
# vLLM renamed time_per_output_token to inter_token_latency and gpu_cache_usage_perc to kv_cache_usage_perc;
# dashboards query either, so both are served.
VLLM_COPIES = (
    ("vllm:time_to_first_token_seconds", "ttft", "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "inter_token", "Histogram of inter-token latency in seconds."),
    ("vllm:time_per_output_token_seconds", "inter_token", "Histogram of time per output token in seconds."),
    ("vllm:e2e_request_latency_seconds", "e2e", "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", "queue", "Histogram of time spent in WAITING phase for request."),
    ("vllm:request_prompt_tokens", "prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:request_generation_tokens", "generation_tokens", "Number of generation tokens processed."),
    ("vllm:prompt_tokens", "prompt_tokens_total", "Number of prefill tokens processed."),
)


def prometheus_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


class ServerMetrics:
    """One registry per server (so several servers can share a process in tests) holding every Weir metric, the
    process's own (CPU, memory, file descriptors, garbage collector) and the vLLM-named copies."""

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
        self.prompt_tokens_total = Counter(
            "weir_prompt_tokens", "Prompt tokens of the Generate calls that reached the engine", ["model"], registry=r
        )
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
        r.register(_VllmCopies(self))
        register_process_collectors(r)

    def observe_rpc(self, method: str, code: str) -> None:
        self.requests.labels(method, code).inc()

    def observe_generation(self, record: GenerationRecord) -> None:
        """Histograms and counters of one Generate call that reached the engine."""
        model = record.model
        for reason in record.finish_reasons or ("cancelled",):
            self.finished.labels(model, reason).inc()
        if record.prompt_tokens:
            self.prompt_tokens_total.labels(model).inc(record.prompt_tokens)
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


def register_process_collectors(registry: Any) -> None:
    """The process's CPU, memory and open files (`process_*`, Linux), Python's version and its garbage
    collector (`python_*`): what the default registry has, on a registry of our own."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


# (name, help, EngineStats reader) per family; `vllm:` ones are labelled like vLLM's.
_Reader = Callable[["EngineStats"], float]
_WEIR_GAUGES: tuple[tuple[str, str, _Reader], ...] = (
    ("weir_requests_running", "Sequences holding KV blocks", lambda s: s.num_running),
    ("weir_requests_waiting", "Sequences queued (new or preempted)", lambda s: s.num_waiting),
    ("weir_kv_cache_usage_ratio", "Fraction of KV blocks held by sequences", lambda s: s.kv_cache_usage),
    ("weir_kv_cache_blocks", "KV blocks allocated", lambda s: s.num_total_blocks),
    ("weir_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache / looked up",
     lambda s: s.prefix_cache_hit_rate),
    ("weir_spec_decode_mean_acceptance_length", "Tokens per verified speculative proposal (1 + accepted)",
     lambda s: s.spec_mean_acceptance_length),
)  # fmt: skip
_WEIR_COUNTERS: tuple[tuple[str, str, _Reader], ...] = (
    ("weir_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
     lambda s: s.prefix_cache_queried_tokens),
    ("weir_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", lambda s: s.prefix_cache_hit_tokens),
    ("weir_preemptions", "Sequences preempted (their KV recomputed later)", lambda s: s.num_preemptions),
    ("weir_generation_tokens", "Tokens generated", lambda s: s.num_generated_tokens),
    ("weir_engine_steps", "Engine iterations run", lambda s: s.num_steps),
    ("weir_spec_decode_drafts", "Speculative proposals verified (one per sequence and step)",
     lambda s: s.spec_num_drafts),
    ("weir_spec_decode_draft_tokens", "Speculative tokens proposed", lambda s: s.spec_num_draft_tokens),
    ("weir_spec_decode_accepted_tokens", "Speculative tokens accepted", lambda s: s.spec_num_accepted_tokens),
)  # fmt: skip
_VLLM_GAUGES: tuple[tuple[str, str, _Reader], ...] = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", lambda s: s.num_running),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lambda s: s.num_waiting),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda s: s.kv_cache_usage),
    ("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda s: s.kv_cache_usage),
)
_VLLM_COUNTERS: tuple[tuple[str, str, _Reader], ...] = (
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", lambda s: s.num_preemptions),
    ("vllm:generation_tokens", "Number of generation tokens processed.", lambda s: s.num_generated_tokens),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
     lambda s: s.prefix_cache_queried_tokens),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
     lambda s: s.prefix_cache_hit_tokens),
    ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", lambda s: s.spec_num_drafts),
    ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", lambda s: s.spec_num_draft_tokens),
    ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", lambda s: s.spec_num_accepted_tokens),
)  # fmt: skip


class _EngineCollector:
    """Reads every generation engine's stats (once per scrape, for both names) and every model's load time."""

    def __init__(self, models: ServedModels) -> None:
        self.models = models

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        weir_labels, vllm_labels = ["model"], ["model_name", "engine"]
        families: list[tuple[Any, _Reader, bool]] = []
        for specs, kind, labels, vllm in (
            (_WEIR_GAUGES, GaugeMetricFamily, weir_labels, False),
            (_WEIR_COUNTERS, CounterMetricFamily, weir_labels, False),
            (_VLLM_GAUGES, GaugeMetricFamily, vllm_labels, True),
            (_VLLM_COUNTERS, CounterMetricFamily, vllm_labels, True),
        ):
            families += [(kind(name, doc, labels=labels), read, vllm) for name, doc, read in specs]
        load = GaugeMetricFamily(
            "weir_model_load_duration_seconds", "Seconds it took to load each model", labels=["model", "task"]
        )
        for model in self.models.models():
            load.add_metric([model.id, model.task], model.load_duration_s)
            if model.generator is None:
                continue
            stats = model.generator.stats()
            for family, read, vllm in families:
                family.add_metric([model.id, VLLM_ENGINE] if vllm else [model.id], read(stats))
        yield from (family for family, _, _ in families)
        yield load
        yield from _gie_info(self.models)


def _gie_info(models: ServedModels) -> Iterator[Any]:
    """The labelled gauges the Gateway API Inference Extension's endpoint picker reads besides the queue and
    KV-cache gauges (its model-server protocol): `vllm:cache_config_info` (block size and block count, for its
    prefix-cache scorer) and `vllm:lora_requests_info` (the adapters with running and waiting requests, comma-joined,
    and the adapters the device holds at once; `max_lora` 0 when LoRA is off; the value is a timestamp, as the
    picker keeps the newest series). Beside them, Weir's per-adapter request gauges."""
    from prometheus_client.core import GaugeMetricFamily

    cache = GaugeMetricFamily(
        "vllm:cache_config_info", "Information of the LLMEngine CacheConfig.",
        labels=["model_name", "engine", "block_size", "num_gpu_blocks"],
    )  # fmt: skip
    lora = GaugeMetricFamily(
        "vllm:lora_requests_info", "Running stats on LoRA requests.",
        labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )  # fmt: skip
    running = GaugeMetricFamily(
        "weir_lora_requests_running", "Requests running per LoRA adapter", labels=["model", "adapter"]
    )
    waiting = GaugeMetricFamily(
        "weir_lora_requests_waiting", "Requests waiting per LoRA adapter", labels=["model", "adapter"]
    )
    now = time.time()
    for model in models.models():
        if model.generator is None:
            continue
        stats = model.generator.stats()
        cache.add_metric([model.id, VLLM_ENGINE, str(stats.block_size), str(stats.num_total_blocks)], 1.0)
        busy = {name: n for name, n in stats.lora_running if n}
        queued = {name: n for name, n in stats.lora_waiting if n}
        max_lora = stats.max_loras if model.lora_enabled else 0
        lora.add_metric([model.id, str(max_lora), ",".join(sorted(busy)), ",".join(sorted(queued))], now)
        for adapter in sorted({*busy, *queued, *(a.name for a in model.adapters())}):
            running.add_metric([model.id, adapter], busy.get(adapter, 0))
            waiting.add_metric([model.id, adapter], queued.get(adapter, 0))
    yield from (cache, lora, running, waiting)


class _VllmCopies:
    """Weir's per-request histograms and counters again under vLLM's names and labels, copied when scraped."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        for name, attribute, doc in VLLM_COPIES:
            for family in getattr(self.metrics, attribute).collect():
                yield _renamed(family, name, doc)
        yield self._request_success()

    def _request_success(self) -> Any:
        """vLLM counts finished requests by its own finish reasons: a stop string is `stop`, a cancel `abort`."""
        from prometheus_client.core import CounterMetricFamily

        totals: dict[tuple[str, str], float] = {}
        for family in self.metrics.finished.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                reason = sample.labels["finish_reason"]
                key = (sample.labels["model"], VLLM_FINISHED_REASONS.get(reason, reason))
                totals[key] = totals.get(key, 0.0) + sample.value
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=["model_name", "engine", "finished_reason"],
        )  # fmt: skip
        for (model, reason), value in totals.items():
            success.add_metric([model, VLLM_ENGINE, reason], value)
        return success


def _renamed(family: Any, name: str, doc: str) -> Any:
    """`family` as `name`: its samples renamed (suffixes kept), `model` labelled `model_name`, `engine` added."""
    from prometheus_client.metrics_core import Metric

    copy = Metric(name, doc, family.type)
    for sample in family.samples:
        labels = {("model_name" if k == "model" else k): v for k, v in sample.labels.items()}
        labels["engine"] = VLLM_ENGINE
        copy.add_sample(name + sample.name[len(family.name) :], labels, sample.value, sample.timestamp)
    return copy


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the server's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not worth a log line each."""


def _classic_text_format(app: Callable[..., Any]) -> Callable[..., Any]:
    """`app` answering every scraper in the classic text format. prometheus-client escapes the `:` of `vllm:` sample
    names to `_` in OpenMetrics unless the scraper asks for UTF-8 names (Prometheus 3 does, 2.x does not), and both
    prefer OpenMetrics; the text format keeps the names as they are."""

    def classic(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return app({**environ, "HTTP_ACCEPT": "text/plain"}, start_response)  # type: ignore[no-any-return]

    return classic


def _require_key(app: Callable[..., Any], keys: tuple[str, ...]) -> Callable[..., Any]:
    """`app` answering 401 to requests without `Authorization: Bearer KEY` for one of `keys`."""
    from weir_server.api.security import bearer_token, key_matches

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        token = bearer_token(environ.get("HTTP_AUTHORIZATION"))
        if token is not None and key_matches(token, keys):
            return app(environ, start_response)  # type: ignore[no-any-return]
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("WWW-Authenticate", "Bearer")]
        start_response("401 Unauthorized", headers)
        return [b"missing or invalid API key; send `Authorization: Bearer <key>`\n"]

    return guarded


def metrics_api_keys(config: ServerConfig) -> tuple[str, ...]:
    """The keys /metrics asks for: the server's API keys with --metrics-require-api-key, else none (open)."""
    return config.api_keys if config.observability.metrics_require_api_key else ()


class MetricsHttpServer:
    """A threaded HTTP server answering /metrics from one registry; with `api_keys`, only to their bearers."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int, api_keys: tuple[str, ...] = ()) -> None:
        from prometheus_client import make_wsgi_app

        app = _classic_text_format(make_wsgi_app(metrics.registry))
        if api_keys:
            app = _require_key(app, api_keys)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
        self._httpd: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="weir-metrics", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port
        logger.info("metrics on http://%s:%d/metrics%s", host, self.port, " (API key required)" if api_keys else "")

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
