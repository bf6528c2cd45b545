"""The HTTP server's limits as configured: flags, config checks, the runner's options, and the log of a request
aiohttp's parser refuses (it never quotes the refused line). The process-level behaviour (slowloris, slow bodies,
oversize heads) is in tests/reliability/test_gateway_limits.py."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

from weir_gateway.cli import build_parser, config_from_args
from weir_gateway.config import GatewayConfig
from weir_gateway.http_limits import ParserErrorLog, server_options

SECRET = "sk-http-limits-0123456789abcdef"


def test_limit_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["--header-timeout", "3", "--body-timeout", "4", "--max-header-bytes", "2048", "--max-headers", "20"]
    )
    config = config_from_args(args)
    assert (config.header_timeout_s, config.body_timeout_s) == (3.0, 4.0)
    assert (config.max_header_bytes, config.max_headers) == (2048, 20)


@pytest.mark.parametrize(
    "field", [{"header_timeout_s": 0}, {"body_timeout_s": -1}, {"max_header_bytes": 0}, {"max_headers": 0}]
)
def test_config_refuses_limits_that_would_refuse_everything(field: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(field))):
        GatewayConfig(**field)  # type: ignore[arg-type]


def test_config_repr_leaves_out_the_keys() -> None:
    config = GatewayConfig(api_keys=(SECRET,), backend_api_key=SECRET + "-backend")
    assert SECRET not in repr(config)


def test_runner_options_carry_the_configured_limits() -> None:
    config = GatewayConfig(header_timeout_s=7, max_header_bytes=4096, max_headers=50)
    options = server_options(config)
    assert options["keepalive_timeout"] == 7  # aiohttp's timer until a request head is complete
    assert options["max_line_size"] == options["max_field_size"] == 4096
    assert options["max_headers"] == 50
    assert options["handler_cancellation"] is True
    assert isinstance(options["logger"], ParserErrorLog)


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (
            LineTooLong(f"Bearer {SECRET}".encode(), 1024),
            "a header or the request line is over 1024 bytes (--max-header-bytes)",
        ),
        (BadHttpMessage("Too many headers received"), "more than 128 headers (--max-headers)"),
        (BadStatusLine(f"GET /?key={SECRET} HTTP/9"), "malformed HTTP (BadStatusLine, status 400)"),
    ],
)
def test_a_refused_request_is_one_info_line_naming_the_limit_not_the_line(
    error: Exception, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = ParserErrorLog(logging.getLogger("test.aiohttp.server"), GatewayConfig(max_header_bytes=1024))
    with caplog.at_level(logging.DEBUG, "test.aiohttp.server"):
        log.exception("Error handling request from %s", "10.0.0.1", exc_info=error)
    (record,) = caplog.records
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == f"refused a request from 10.0.0.1: {says}"
    assert SECRET not in caplog.text


def test_other_server_errors_are_logged_as_they_were(caplog: pytest.LogCaptureFixture) -> None:
    log = ParserErrorLog(logging.getLogger("test.aiohttp.server"), GatewayConfig())
    with caplog.at_level(logging.DEBUG, "test.aiohttp.server"):
        log.exception("Unhandled exception", exc_info=RuntimeError("boom"))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.getMessage() == "Unhandled exception"
    assert record.exc_info is not None


def test_a_slow_body_gets_a_408_naming_the_timeout(make_gateway, fake) -> None:
    gateway = make_gateway(GatewayConfig(backends=(fake.address,), body_timeout_s=0.5))
    host, port = gateway.url.removeprefix("http://").split(":")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        started = time.monotonic()
        answer = sock.recv(65536)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"request body not received within 0.5s" in answer
    assert waited < 5
