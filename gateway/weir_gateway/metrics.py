"""Prometheus metrics of the gateway on `GET /metrics`: HTTP requests by route and status, their latency, requests
in flight, each backend's health and outstanding calls (read from the pool at scrape time), and the process's own.

Every name of ours is in the `weir_gateway_` namespace with its unit; the process's are the usual `process_*` and
`python_*`. /metrics is open to scrapers unless `metrics_require_api_key` puts it behind the API keys. Without
prometheus-client there is no /metrics.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from weir_gateway.backends import Backend
from weir_gateway.outcome import handle_and_record
from weir_gateway.state import CONFIG

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
METRICS_PATH = "/metrics"


class GatewayMetrics:
    """One registry per application (tests run several gateways in one process)."""

    def __init__(self, backends: Callable[[], list[Backend]]) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            GCCollector,
            Histogram,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "weir_gateway_http_requests", "HTTP requests answered, by method, route and status",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "weir_gateway_http_request_duration_seconds", "From a request's arrival to the end of its answer "
            "(streams included)", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("weir_gateway_http_requests_in_flight", "HTTP requests being answered", registry=r)
        r.register(_BackendCollector(backends))
        # What the default registry has, on ours: CPU, memory, open files (Linux), Python and its collector.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BackendCollector:
    """Backend health and load, read from the pool when scraped."""

    def __init__(self, backends: Callable[[], list[Backend]]) -> None:
        self.backends = backends

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "weir_gateway_backend_up", "1 while the backend is SERVING and reachable", labels=["backend"]
        )
        outstanding = GaugeMetricFamily(
            "weir_gateway_backend_outstanding_requests", "Calls the gateway has in flight on the backend",
            labels=["backend"],
        )  # fmt: skip
        for backend in self.backends():
            up.add_metric([backend.address], 1.0 if backend.available else 0.0)
            outstanding.add_metric([backend.address], backend.outstanding)
        yield up
        yield outstanding


METRICS = web.AppKey("metrics", GatewayMetrics)


def metrics_open(request: web.Request) -> bool:
    """Whether this is a scrape of /metrics that needs no API key (the default)."""
    return request.path == METRICS_PATH and not request.app[CONFIG].metrics_require_api_key


def _route(request: web.Request) -> str:
    """The matched route's pattern (bounded label values), not the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by route and final status (errors included: place it outside the error
    middleware)."""
    metrics = request.app.get(METRICS)
    if metrics is None:
        return await handler(request)
    started = time.perf_counter()
    metrics.in_flight.inc()

    def record(status: int) -> None:
        metrics.in_flight.dec()
        metrics.observe(request.method, _route(request), status, time.perf_counter() - started)

    return await handle_and_record(request, handler, record)


async def metrics_handler(request: web.Request) -> web.Response:
    """`GET /metrics` in the Prometheus text format."""
    body, content_type = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def install_metrics(app: web.Application, backends: Callable[[], list[Backend]]) -> bool:
    """Add /metrics and the counting middleware to `app` (before it starts); False when prometheus-client is
    missing."""
    if importlib.util.find_spec("prometheus_client") is None:
        logger.warning("prometheus-client is not installed; the gateway has no /metrics")
        return False
    from prometheus_client import disable_created_metrics

    # The `_created` series only double the scrape size. (prometheus-client leaves this function unannotated.)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    app[METRICS] = GatewayMetrics(backends)
    app.router.add_get(METRICS_PATH, metrics_handler)
    return True
