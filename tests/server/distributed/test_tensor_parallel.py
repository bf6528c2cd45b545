"""Tensor parallelism on CPU over gloo: rank 0 is this process, rank 1 a worker started by the real launcher.

The tiny Llama has an odd vocabulary (padded vocabulary shards), grouped-query attention and is read from
safetensors as lazy slices; prompts are long enough for chunked prefill mixed with decodes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, ParallelConfig, SchedulerConfig
from weir_server.distributed import parallel_state
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.executor.tp_executor import TensorParallelExecutor, launch
from weir_server.models.loader import load_model

VOCAB = 251  # odd: the second rank's vocabulary shard is padded
PROMPTS = [[5, 17, 33, 9, 100], [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11], list(range(60, 97))]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama saved by transformers (safetensors) with a word-level tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), VOCAB)


def engine_config(directory: Path, tensor_parallel_size: int) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(str(directory), dtype="float32", device="cpu"),  # exact sums: logprobs compared
        cache=CacheConfig(block_size=4, num_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16),  # the long prompt is chunked
        executor=ExecutorConfig(num_threads=1),
        parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size, collective_timeout_s=60),
    )


def greedy(engine: EngineCore, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    """Each request's greedy tokens and their logprobs, stepping the engine until all finish."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", prompt, params))
    results: dict[str, tuple[list[int], list[float]]] = {f"r{i}": ([], []) for i in range(len(prompts))}
    while engine.has_unfinished():
        for output in engine.step():
            assert output.error is None, output.error
            tokens, logprobs = results[output.request_id]
            tokens += output.token_ids
            logprobs += [entry.logprob for entry in output.logprobs or []]
    return results


@pytest.fixture(scope="module")
def single_rank(model_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    config = engine_config(model_dir, 1)
    return greedy(EngineCore(load_model(config.model), config), PROMPTS)


@pytest.fixture(scope="module")
def two_ranks(model_dir: Path) -> Iterator[tuple[TensorParallelExecutor, EngineCore, list[str]]]:
    """Rank 0 here, rank 1 in a worker process; worker deaths are recorded instead of exiting pytest."""
    config = engine_config(model_dir, 2)
    deaths: list[str] = []
    executor = launch(config, on_worker_death=deaths.append)
    assert executor is not None
    try:
        yield executor, EngineCore(load_model(config.model), config, publisher=executor), deaths
    finally:
        executor.shutdown()
        assert not parallel_state.get().is_parallel


def test_two_ranks_give_the_same_greedy_tokens_as_one(single_rank, two_ranks) -> None:
    _, engine, _ = two_ranks
    assert parallel_state.tp_size() == 2
    attention = engine.loaded.model.model.layers[0].self_attn
    assert (attention.num_heads, attention.num_kv_heads) == (2, 1)  # half the heads, half the KV cache
    assert engine.runner.kv_caches[0].shape[-2] == 1
    sharded = greedy(engine, PROMPTS)
    for request_id, (tokens, logprobs) in single_rank.items():
        assert sharded[request_id][0] == tokens
        torch.testing.assert_close(torch.tensor(sharded[request_id][1]), torch.tensor(logprobs), atol=1e-4, rtol=0)


def test_a_dead_worker_fails_the_engine_with_a_clear_error(two_ranks) -> None:
    """Runs last in this module: it kills the worker of the shared two-rank group."""
    executor, engine, deaths = two_ranks
    worker = executor._procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    deadline = time.monotonic() + 10
    while not deaths and time.monotonic() < deadline:  # the watcher thread reports it on its own
        time.sleep(0.05)
    assert deaths and "rank 1" in deaths[0] and "SIGKILL" in deaths[0]
    engine.add_request(GenerationRequest("after", PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0)))
    started = time.monotonic()
    outputs = engine.step()
    assert time.monotonic() - started < 5
    assert [o.request_id for o in outputs] == ["after"]
    assert outputs[0].finished and "tensor-parallel worker rank 1" in (outputs[0].error or "")
    assert not engine.has_unfinished()
