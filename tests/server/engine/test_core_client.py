"""The core in its own process (`--engine-core process`, `ProcessClient`): same outputs as a core on a thread
(`InProcessClient`), validation and queue limits on the server side, aborts reaching the core, and a dead core
failing its streams. Also one real gRPC server with a process core, called by the Python client."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tiny_models import save_tiny_llama

from weir_client import AsyncWeirClient
from weir_server.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
)
from weir_server.engine.async_engine import AsyncEngine
from weir_server.engine.core_client import InProcessClient, ProcessClient
from weir_server.engine.factory import create_engine
from weir_server.engine.types import FinishReason, GenerationOutput, GenerationRequest, SamplingParams
from weir_server.errors import EngineUnavailableError, InvalidRequestError, QueueFullError
from weir_server.models.loader import load_model

pytestmark = pytest.mark.timeout(180)

VOCAB = 199
PROMPTS = [[5, 17, 33, 9, 100], [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11], list(range(60, 97))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-core"), VOCAB)


THREAD = ExecutorConfig(num_threads=1, engine_core="thread")


def engine_config(directory: Path, max_num_seqs: int = 8, max_waiting: int = 64) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(str(directory), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=16, max_waiting=max_waiting),
        executor=ExecutorConfig(num_threads=1, engine_core="process"),
    )


async def started_core(config: EngineConfig) -> AsyncEngine:
    core = create_engine(load_model(config.model, "generate", weights=False), config)
    assert isinstance(core.client, ProcessClient)
    await core.start()
    return core


async def collect(stream: AsyncIterator[GenerationOutput]) -> dict[int, tuple[list[int], str, str | None]]:
    choices: dict[int, tuple[list[int], str, str | None]] = {}
    async for output in stream:
        assert output.error is None, output.error
        tokens, text, _ = choices.get(output.index, ([], "", None))
        choices[output.index] = (tokens + output.token_ids, text + output.text, output.finish_reason)
    return choices


async def run_all(engine: AsyncEngine) -> list[dict[int, tuple[list[int], str, str | None]]]:
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.8, seed=7, n=2, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(150,)),
        # The core makes the text of choices with stop strings; the server makes the rest, stop tokens' included.
        SamplingParams(max_tokens=15, temperature=0.9, seed=3, stop=("w1",)),
        SamplingParams(max_tokens=15, temperature=0.9, seed=4, stop_token_ids=tuple(range(100, 199))),
        SamplingParams(
            max_tokens=15,
            temperature=0.9,
            seed=4,
            stop_token_ids=tuple(range(100, 199)),
            include_stop_str_in_output=True,
        ),
    ]
    streams = [engine.generate(GenerationRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], p)) for i, p in enumerate(params)]
    return list(await asyncio.gather(*(collect(s) for s in streams)))


async def test_process_core_gives_the_thread_engines_outputs(model_dir: Path) -> None:
    config = engine_config(model_dir)
    thread = create_engine(load_model(config.model, "generate"), dataclasses.replace(config, executor=THREAD))
    assert isinstance(thread.client, InProcessClient)
    await thread.start()
    try:
        expected = await run_all(thread)
        # The stop cases below did stop (a stop string; stop tokens with and without their text).
        stopped = [FinishReason.STOP_SEQUENCE, FinishReason.STOP, FinishReason.STOP]
        assert [expected[i][0][2] for i in (3, 4, 5)] == stopped
        assert expected[5][0][1].endswith(" w102")
    finally:
        await thread.shutdown()
    core = await started_core(config)
    try:
        assert core.is_running
        assert await run_all(core) == expected
        assert core.stats().num_generated_tokens > 0
    finally:
        await core.shutdown()
    assert not core.is_running


async def test_bad_requests_are_refused_here_and_the_queue_limit_counts_running_plus_waiting(model_dir: Path) -> None:
    core = await started_core(engine_config(model_dir, max_num_seqs=1, max_waiting=1))
    try:
        with pytest.raises(InvalidRequestError) as bad:
            core.generate(GenerationRequest("bad", [3, VOCAB + 5], SamplingParams()))
        assert bad.value.field == "prompt"
        with pytest.raises(InvalidRequestError) as long:
            core.generate(GenerationRequest("long", [3] * 300, SamplingParams()))
        assert "300 tokens" in str(long.value)
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        first = core.generate(GenerationRequest("a", [3, 4], params))
        second = core.generate(GenerationRequest("b", [3, 4], params))
        with pytest.raises(QueueFullError):
            core.generate(GenerationRequest("c", [3, 4], params))
        assert (await anext(first)).request_id == "a"
        await first.aclose()  # the abort frees its slot in the core
        await second.aclose()
        for _ in range(200):
            if core.stats().num_running == 0 and core.stats().num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert core.stats().num_running == 0
        again = await collect(core.generate(GenerationRequest("d", [3, 4], SamplingParams(max_tokens=3))))
        assert len(again[0][0]) <= 3
    finally:
        await core.shutdown()


async def test_a_dead_core_fails_its_streams_as_unavailable(model_dir: Path) -> None:
    core = await started_core(engine_config(model_dir))
    try:
        stream = core.generate(GenerationRequest("long", [5, 6, 7], SamplingParams(max_tokens=250, ignore_eos=True)))
        await anext(stream)
        process = core.client._process
        assert process is not None and process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailableError):
            async for _ in stream:
                pass
        assert not core.is_running
        with pytest.raises(EngineUnavailableError):
            core.generate(GenerationRequest("after", [5], SamplingParams()))
    finally:
        await core.shutdown()


async def test_grpc_server_with_a_process_core(model_dir: Path) -> None:
    from weir_server.api.server import WeirServer

    server = WeirServer(ServerConfig(host="127.0.0.1", port=0, generate=engine_config(model_dir), embed=None))
    await server.start()
    try:
        model = server.registry.default("generate")
        assert model is not None and model.generator is not None
        assert isinstance(model.generator.client, ProcessClient)
        async with AsyncWeirClient(server.address, timeout=60) as client:
            result = await client.complete("w5 w6 w7", max_tokens=6, temperature=0.0, ignore_eos=True)
        assert len(result.choices[0].token_ids) == 6 and result.choices[0].finish_reason == "length"
    finally:
        await server.stop(grace=1.0)


async def test_a_dead_core_turns_the_server_not_serving_and_ends_it(model_dir: Path) -> None:
    from grpc_health.v1 import health_pb2

    from weir_server.api.server import WeirServer

    server = WeirServer(ServerConfig(host="127.0.0.1", port=0, generate=engine_config(model_dir), embed=None))
    await server.start()
    try:
        model = server.registry.default("generate")
        assert model is not None and model.generator is not None
        assert isinstance(model.generator.client, ProcessClient)
        process = model.generator.client._process
        assert process is not None and process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        assert server.engine_failure is not None
        reason = await asyncio.wait_for(server.engine_failure, timeout=30)
        assert "engine core process exited" in reason
        for _ in range(100):  # health flips on the loop right after
            status = (await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(grace=1.0)


async def test_a_process_core_leads_its_own_tensor_parallel_group(model_dir: Path) -> None:
    """The core, not the server process, is rank 0: it starts the worker and gives the single-rank tokens."""
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    one = await started_core(engine_config(model_dir))
    try:
        expected = await collect(one.generate(GenerationRequest("one", PROMPTS[1], params)))
    finally:
        await one.shutdown()
    base = engine_config(model_dir)
    config = dataclasses.replace(base, parallel=ParallelConfig(tensor_parallel_size=2, collective_timeout_s=60))
    two = await started_core(config)
    try:
        assert await collect(two.generate(GenerationRequest("two", PROMPTS[1], params))) == expected
    finally:
        await two.shutdown()


@pytest.mark.parametrize(
    ("choice", "embeds_here", "want"),
    [("auto", False, "process"), ("auto", True, "auto"), ("thread", False, "thread"), ("process", True, "process")],
)
def test_a_servers_auto_core_is_a_process_unless_an_embedding_model_shares_the_server(choice, embeds_here, want):
    from weir_server.engine.factory import runs_in_own_process, server_engine_config

    config = EngineConfig(ModelConfig("m", device="cpu"), executor=ExecutorConfig(engine_core=choice))
    resolved = server_engine_config(config, embeds_here)
    assert resolved.executor.engine_core == want
    # "auto" left as it is: a thread on CPU (where the embedding model brought torch into the server process).
    assert runs_in_own_process(resolved) == (want == "process")
