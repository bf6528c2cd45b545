"""The engine on CUDA (skipped without a GPU): profiled KV sizing, and batching/preemption keeping greedy output."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import LlamaConfig

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.factory import thread_engine
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import LoadedModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1,
    )  # fmt: skip
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return LoadedModel(
        model, config, None, "tiny", "LlamaForCausalLM", "generate", 256, 512, torch.float32, device, (1,), "last"
    )


def _config(num_blocks: int | None) -> EngineConfig:
    return EngineConfig(
        ModelConfig("tiny"),
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, gpu_memory_utilization=0.5),
        scheduler=SchedulerConfig(max_num_batched_tokens=64),
    )


def _requests() -> list[GenerationRequest]:
    generator = torch.Generator().manual_seed(0)
    return [
        GenerationRequest(
            f"r{i}",
            torch.randint(2, 512, (5 + 13 * i,), generator=generator).tolist(),
            SamplingParams(
                max_tokens=20,
                temperature=0.0 if i % 2 else 0.8,
                seed=i,
                ignore_eos=True,
                logprobs=2,
                top_p=0.9,
                top_k=50,
                repetition_penalty=1.1,
                prompt_logprobs=1 if i == 3 else None,
            ),  # fmt: skip
        )
        for i in range(8)
    ]


def _run(engine: EngineCore, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    for request in requests:
        engine.add_request(engine.validate(request))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def test_cuda_kv_cache_is_sized_by_profiling(loaded):
    engine = EngineCore(loaded, _config(None))
    free, total = torch.cuda.mem_get_info()
    assert engine.block_manager.num_total_blocks > 1000
    assert free > total * 0.4  # the cache stays within gpu_memory_utilization


def test_cuda_batching_preemption_and_async_match_running_alone(loaded):
    requests = _requests()
    alone = {r.request_id: _run(EngineCore(loaded, _config(64)), [r])[r.request_id] for r in requests}
    assert _run(EngineCore(loaded, _config(64)), requests) == alone
    tight = EngineCore(loaded, _config(12))
    assert _run(tight, requests) == alone and tight.scheduler.num_preemptions > 0

    async def streamed() -> list[list[int]]:
        engine = thread_engine(EngineCore(loaded, _config(64)))
        await engine.start()
        try:

            async def one(request: GenerationRequest) -> list[int]:
                return [t async for out in engine.generate(request) for t in out.token_ids]

            return await asyncio.gather(*(one(r) for r in requests))
        finally:
            await engine.shutdown()

    assert asyncio.run(streamed()) == [alone[r.request_id] for r in requests]
