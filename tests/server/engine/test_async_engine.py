"""AsyncEngine over a core on a thread: concurrent streams, n choices, aborts, step failures, validation before the
first output."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import greedy, prompt, run_alone

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from weir_server.engine.async_engine import AsyncEngine, RequestStream
from weir_server.engine.factory import create_engine
from weir_server.engine.types import FinishReason, GenerationOutput, GenerationRequest, SamplingParams
from weir_server.errors import InvalidRequestError, QueueFullError

pytestmark = pytest.mark.timeout(60)


def _config(num_blocks: int = 128, max_waiting: int = 1024, max_num_seqs: int = 16) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig("tiny-llama", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=128, max_waiting=max_waiting),
    )


@pytest.fixture
async def engine(tiny_loaded):
    engine = create_engine(tiny_loaded, _config())
    await engine.start()
    yield engine
    await engine.shutdown()


async def _collect(engine: AsyncEngine, request: GenerationRequest) -> list[GenerationOutput]:
    return [out async for out in engine.generate(request)]


async def _wait_idle(engine: AsyncEngine) -> None:
    for _ in range(500):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


async def test_many_concurrent_generate_calls_all_finish_with_their_own_tokens(engine, tiny_loaded):
    requests = [GenerationRequest(f"c{i}", prompt(i, 3 + i), greedy(4 + i % 5)) for i in range(24)]
    results = await asyncio.gather(*(_collect(engine, r) for r in requests))
    for request, outputs in zip(requests, results, strict=True):
        assert outputs[-1].finish_reason is FinishReason.LENGTH
        assert sum(len(o.token_ids) for o in outputs) == request.params.max_tokens
        assert outputs[-1].usage is not None and outputs[-1].usage.prompt_tokens == len(request.prompt_token_ids)
    assert [t for o in results[5] for t in o.token_ids] == run_alone(tiny_loaded, requests[5])
    await _wait_idle(engine)


async def test_n_greater_than_one_gives_n_indexed_choices(engine):
    params = SamplingParams(n=3, max_tokens=5, temperature=1.0, ignore_eos=True, seed=1)
    outputs = await _collect(engine, GenerationRequest("n3", prompt(1, 9), params))
    finished = {o.index: o for o in outputs if o.finished}
    assert sorted(finished) == [0, 1, 2]
    for index in range(3):
        assert sum(len(o.token_ids) for o in outputs if o.index == index) == 5


async def test_closing_the_stream_aborts_the_request_and_frees_its_blocks(engine):
    stream = engine.generate(GenerationRequest("long", prompt(2, 20), greedy(200)))
    first = await anext(stream)
    assert not first.finished
    await stream.aclose()
    await _wait_idle(engine)


async def test_cancelling_the_consumer_task_aborts_the_request(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(GenerationRequest("cancel", prompt(3, 20), greedy(200))):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(engine)


async def test_invalid_request_raises_before_anything_is_yielded(engine):
    with pytest.raises(InvalidRequestError) as error:
        engine.generate(GenerationRequest("empty", [], greedy(3)))
    assert error.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as error:
        engine.generate(GenerationRequest("t", [3], SamplingParams(temperature=5.0)))
    assert error.value.field == "sampling_params.temperature"


async def test_full_waiting_queue_raises_queue_full(tiny_loaded):
    engine = create_engine(tiny_loaded, _config(max_waiting=1, max_num_seqs=1))
    await engine.start()
    try:
        with engine.client.busy_loop._wakeup:  # hold the engine thread so the requests are still queued
            first = engine.generate(GenerationRequest("q1", prompt(1, 4), greedy(2)))
            second = engine.generate(GenerationRequest("q2", prompt(2, 4), greedy(2)))  # one slot + one waiting
            with pytest.raises(QueueFullError):
                engine.generate(GenerationRequest("q3", prompt(3, 4), greedy(2)))
        await second.aclose()
        assert (await anext(first)).request_id == "q1"
        await first.aclose()
    finally:
        await engine.shutdown()


async def test_step_exception_fails_only_that_steps_requests_and_engine_keeps_running(engine, monkeypatch):
    original = engine.client.core.runner.execute

    def flaky(batch, *rest):
        if any(s.seq.request_id == "bad" for s in batch):
            raise RuntimeError("injected failure")
        return original(batch, *rest)

    monkeypatch.setattr(engine.client.core.runner, "execute", flaky)
    bad = await _collect(engine, GenerationRequest("bad", prompt(4, 6), greedy(3)))
    assert bad[-1].finish_reason is FinishReason.ERROR and "injected failure" in (bad[-1].error or "")
    good = await _collect(engine, GenerationRequest("good", prompt(5, 6), greedy(3)))
    assert good[-1].finish_reason is FinishReason.LENGTH
    await _wait_idle(engine)


async def test_duplicate_request_id_in_flight_is_rejected(engine):
    stream = engine.generate(GenerationRequest("dup", prompt(6, 4), greedy(50)))
    with pytest.raises(InvalidRequestError) as error:
        engine.generate(GenerationRequest("dup", prompt(6, 4), greedy(5)))
    assert error.value.field == "request_id"
    await stream.aclose()


async def test_slow_consumer_gets_merged_outputs_of_several_tokens(engine):
    stream = engine.generate(GenerationRequest("slow", prompt(7, 5), greedy(12)))
    await asyncio.sleep(0.5)
    outputs = [o async for o in stream]
    assert sum(len(o.token_ids) for o in outputs) == 12
    assert any(len(o.token_ids) > 1 for o in outputs)
    assert outputs[-1].finished and sum(o.finished for o in outputs) == 1


def test_request_stream_merges_queued_outputs_of_the_same_choice():
    async def scenario():
        stream = RequestStream("r", 2)
        stream.put(GenerationOutput("r", 0, "a", [1]))
        stream.put(GenerationOutput("r", 1, "x", [9]))
        stream.put(GenerationOutput("r", 0, "b", [2], finish_reason=FinishReason.STOP))
        stream.put(GenerationOutput("r", 1, "y", [8], finish_reason=FinishReason.LENGTH))
        return [o async for o in _drain(stream)]

    async def _drain(stream):
        while (out := await stream.get()) is not None:
            yield out

    outputs = asyncio.run(scenario())
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in outputs] == [
        (0, "ab", [1, 2], FinishReason.STOP),
        (1, "xy", [9, 8], FinishReason.LENGTH),
    ]


async def test_shutdown_fails_open_streams_and_refuses_new_requests(tiny_loaded):
    from weir_server.errors import EngineUnavailableError

    engine = create_engine(tiny_loaded, _config())
    await engine.start()
    stream = engine.generate(GenerationRequest("s", prompt(8, 5), greedy(200)))
    await anext(stream)
    await engine.shutdown()
    with pytest.raises(EngineUnavailableError):
        async for _ in stream:
            pass
    with pytest.raises(EngineUnavailableError):
        engine.generate(GenerationRequest("t", prompt(8, 5), greedy(2)))
