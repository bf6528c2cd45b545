"""Client-side load balancing over several servers: one channel to `ipv4:a,b` with round_robin and gRPC health
checking in its service config spreads calls over both, and stops sending to a server that leaves."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_support import ServerProcess, metric, parse_metrics

from weir_client import WeirClient

ARGS = ["--load-format", "dummy", "--embed-model", "none", "--max-model-len", "128", "--num-kv-blocks", "16",
        "--metrics-port", "0", "--log-format", "json", "--drain-timeout", "2"]  # fmt: skip


def _tokenize_calls(server: ServerProcess) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        return metric(parse_metrics(reply.read().decode()), "weir_requests_total", method="Tokenize", code="OK")


@pytest.fixture
def second_server(tiny_model: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(["--model", str(tiny_model), *ARGS]).start()
    yield server
    server.stop()


def test_round_robin_spreads_calls_over_healthy_servers_and_skips_one_that_leaves(traced_server, second_server):
    first, second = traced_server, second_server
    target = "ipv4:" + ",".join((first.target, second.target))
    with WeirClient(target, load_balancing="round_robin", timeout=10) as client:
        client.wait_until_ready(30)  # one subchannel is enough for this: the other may still be connecting
        deadline = time.monotonic() + 30
        while _tokenize_calls(second) == 0:
            assert time.monotonic() < deadline, "the second server never got a call"
            client.tokenize(["warm up"])
        before, before_second = _tokenize_calls(first), _tokenize_calls(second)
        for _ in range(10):
            assert client.tokenize(["hello world"])[0].token_ids
        on_first, on_second = _tokenize_calls(first) - before, _tokenize_calls(second) - before_second
        assert on_first + on_second == 10
        assert on_first >= 3 and on_second >= 3  # round robin, not pick_first

        second.stop()  # drains: NOT_SERVING at once, then exits
        time.sleep(0.5)
        for _ in range(6):
            assert client.tokenize(["hello again"])[0].token_ids
        assert _tokenize_calls(first) - before == on_first + 6


def test_load_balancing_policy_is_checked():
    with pytest.raises(ValueError, match="round_robin"):
        WeirClient("localhost:1", load_balancing="random")
