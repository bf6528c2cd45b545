"""The server as an operator sees it: ListModels, health, reflection through grpcurl, and `weir serve` itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weir_client import WeirClient

pytestmark = pytest.mark.slow

GRPCURL = Path(sys.executable).parent / "grpcurl"


def test_list_models_describes_both_models(weir_client: WeirClient) -> None:
    models = {m.id: m for m in weir_client.list_models()}
    generate, embed = models["smollm2-135m-instruct"], models["all-minilm-l6-v2"]
    assert (generate.task, generate.is_default, generate.architecture) == ("generate", True, "LlamaForCausalLM")
    assert generate.max_context_length == 1024 and generate.vocab_size == 49152
    assert (embed.task, embed.is_default, embed.architecture) == ("embed", True, "BertModel")
    assert embed.max_context_length == 512
    assert all(m.dtype and m.device for m in models.values())


@pytest.mark.parametrize("service", ["", "weir.v1.InferenceService"])
def test_health_is_serving_after_load(weir_target: str, service: str) -> None:
    with grpc.insecure_channel(weir_target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def _grpcurl(*args: str) -> str:
    binary = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    if binary is None:
        pytest.skip("grpcurl is not installed")
    result = subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_services_through_reflection(weir_target: str) -> None:
    services = _grpcurl(weir_target, "list").split()
    assert {"weir.v1.InferenceService", "grpc.health.v1.Health"} <= set(services)
    assert any(s.startswith("grpc.reflection.") for s in services)


def test_grpcurl_calls_generate_with_json_and_no_protos(weir_target: str) -> None:
    body = json.dumps({"prompt": "Hello", "sampling_params": {"max_tokens": 3, "temperature": 0, "ignore_eos": True}})
    output = _grpcurl("-d", body, weir_target, "weir.v1.InferenceService/Generate")
    messages = [json.loads(chunk) for chunk in output.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    # grpcurl prints proto field names or their lowerCamelCase JSON names, depending on its version.
    last = messages[-1]
    assert last.get("finish_reason", last.get("finishReason")) == "FINISH_REASON_LENGTH", output
    assert sum(len(m.get("token_ids", m.get("tokenIds", []))) for m in messages) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_weir_serve_starts_reports_serving_and_drains_on_sigterm() -> None:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "weir_client.cli",
        "serve",
        "--port",
        str(port),
        "--model",
        "none",
        "--embed-model",
        "none",
        "--drain-timeout",
        "2",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with WeirClient(f"127.0.0.1:{port}") as client:
            client.wait_until_ready(timeout=120)
            assert client.list_models() == []
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert f"ready on 127.0.0.1:{port}" in stderr
    assert "stopped" in stderr


def test_weir_serve_refuses_an_unknown_model_with_a_clear_message() -> None:
    command = [
        sys.executable,
        "-m",
        "weir_client.cli",
        "serve",
        "--port",
        str(_free_port()),
        "--model",
        "/no/such/model.gguf",
        "--embed-model",
        "none",
    ]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "/no/such/model.gguf" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 120


async def test_health_is_not_serving_until_the_models_load() -> None:
    import asyncio

    from weir_client import AsyncWeirClient, WeirClientError
    from weir_server.api.server import WeirServer
    from weir_server.config import ServerConfig

    server = WeirServer(ServerConfig(port=0, generate=None, embed=None))
    loaded = asyncio.Event()
    real_load = server.registry.load

    async def slow_load(config: ServerConfig) -> None:
        await loaded.wait()
        await real_load(config)

    server.registry.load = slow_load  # type: ignore[method-assign]
    starting = asyncio.create_task(server.start())
    while server.port is None:
        await asyncio.sleep(0.01)
    async with AsyncWeirClient(server.address, max_attempts=1, timeout=5) as client:
        await asyncio.sleep(0.1)
        assert await client.health() == "NOT_SERVING"
        assert await client.health("weir.v1.InferenceService") == "NOT_SERVING"
        with pytest.raises(WeirClientError) as info:
            await client.list_models()
        assert info.value.code.name == "UNAVAILABLE"
        loaded.set()
        await starting
        assert await client.health() == "SERVING"
        assert await client.list_models() == []
    await server.stop(grace=0.5)
