"""JSON logs carry request ids; the gateway writes one access line per request; tracing and metrics turn into
no-ops when they are not configured or their packages are missing."""

from __future__ import annotations

import json
import logging
import sys

import aiohttp
import pytest
from ops_support import ServerProcess, running_gateway

from weir_gateway import logging_setup as gateway_logging
from weir_gateway.telemetry import client_interceptors, create_tracer_provider, tracing_middlewares
from weir_server import logging_setup as server_logging
from weir_server.api.model_registry import ServedModels
from weir_server.config import ObservabilityConfig


@pytest.mark.parametrize("module", [server_logging, gateway_logging], ids=["server", "gateway"])
def test_json_lines_carry_the_request_id_and_extra_fields(module):
    record = logging.makeLogRecord({"name": "weir.test", "levelname": "INFO", "msg": "took %d ms", "args": (5,)})
    record.status = 200
    token = module.request_id_var.set("req-42")
    try:
        module.RequestIdFilter().filter(record)
    finally:
        module.request_id_var.reset(token)
    entry = json.loads(module.JsonFormatter().format(record))
    assert entry["message"] == "took 5 ms" and entry["level"] == "info" and entry["logger"] == "weir.test"
    assert entry["request_id"] == "req-42" and entry["status"] == 200
    assert entry["ts"].endswith("Z")


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="json"):
        server_logging.configure_logging("info", "xml")


async def test_gateway_writes_one_access_line_per_request_with_its_id(traced_server: ServerProcess, caplog):
    caplog.set_level(logging.INFO, logger="weir_gateway.access")
    async with running_gateway([traced_server.target]) as url, aiohttp.ClientSession() as http:
        for request_id in ("first-id", "second-id"):
            async with http.get(f"{url}/v1/models", headers={"X-Request-Id": request_id}) as reply:
                assert reply.status == 200
    lines = [r for r in caplog.records if r.name == "weir_gateway.access"]
    assert [r.request_id for r in lines] == ["first-id", "second-id"]
    assert all(r.status == 200 and r.method == "GET" and r.path == "/v1/models" for r in lines)


def test_tracing_is_off_without_an_endpoint():
    from weir_server.telemetry import create_tracing

    assert create_tracing(ObservabilityConfig()) is None
    assert create_tracer_provider(None) is None
    assert tracing_middlewares(None) == [] and client_interceptors(None) == []


def test_tracing_turns_off_with_a_warning_when_opentelemetry_is_missing(monkeypatch, caplog):
    from weir_server.telemetry import create_tracing

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # makes the import fail
    config = ObservabilityConfig(otlp_endpoint="http://127.0.0.1:4317")
    assert create_tracing(config) is None
    assert create_tracer_provider(config.otlp_endpoint) is None
    assert "tracing is off" in caplog.text


def test_metrics_turn_off_with_a_warning_when_prometheus_client_is_missing(monkeypatch, caplog):
    from weir_server import metrics

    monkeypatch.setattr(metrics, "prometheus_available", lambda: False)
    assert metrics.create_metrics(ServedModels()) is None
    assert "metrics are off" in caplog.text
