"""/metrics is open to scrapers by default, API keys or not; --metrics-require-api-key puts it behind the keys, on the
server's metrics port and on the gateway."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from ops_support import REPO, ServerProcess

from weir_gateway.app import create_app
from weir_gateway.config import GatewayConfig
from weir_gateway.state import POOL

KEY = "metrics-test-key"
TINY_ARGS = ["--load-format", "dummy", "--embed-model", "none", "--max-model-len", "128", "--num-kv-blocks", "16",
             "--metrics-port", "0", "--log-format", "json"]  # fmt: skip


def _get(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def keyed_server(tiny_model: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(["--model", str(tiny_model), *TINY_ARGS, "--api-key", KEY, "--metrics-require-api-key"])
    yield server.start()
    server.stop()


def test_server_metrics_port_answers_only_with_an_api_key_when_required(keyed_server: ServerProcess):
    assert _get(keyed_server.metrics_url) == 401
    assert _get(keyed_server.metrics_url, "wrong-key") == 401
    assert _get(keyed_server.metrics_url, KEY) == 200


def test_server_metrics_port_is_open_by_default(traced_server: ServerProcess):
    assert _get(traced_server.metrics_url) == 200


@contextlib.asynccontextmanager
async def _gateway(backend: str, require: bool) -> AsyncIterator[str]:
    config = GatewayConfig(port=0, backends=(backend,), api_keys=(KEY,), metrics_require_api_key=require)
    runner = web.AppRunner(create_app(config), handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        assert await runner.app[POOL].wait_serving(30.0)
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _status(http: aiohttp.ClientSession, url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.get(url, headers=headers) as reply:
        return reply.status


@pytest.mark.parametrize("require", [False, True], ids=["open", "required"])
async def test_gateway_metrics_follow_the_flag_while_the_api_stays_keyed(traced_server: ServerProcess, require):
    async with _gateway(traced_server.target, require) as url, aiohttp.ClientSession() as http:
        assert await _status(http, f"{url}/v1/models") == 401
        assert await _status(http, f"{url}/metrics") == (401 if require else 200)
        assert await _status(http, f"{url}/metrics", KEY) == 200


@pytest.mark.parametrize("module", ["weir_server.cli", "weir_gateway.cli"])
def test_requiring_a_key_for_metrics_without_any_key_is_a_configuration_error(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--metrics-require-api-key"], capture_output=True, text=True, timeout=60,
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--metrics-require-api-key needs an API key" in lines[0], result.stderr
