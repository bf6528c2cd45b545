"""`--kv-cache-dtype fp8`: the KV cache in float8 e4m3 (scale 1.0) gives the bf16 cache's greedy tokens on the tiny
model (weights large enough that its choices are not near-ties), through the Triton attention kernels and CUDA
graphs."""

from __future__ import annotations

import pytest
import torch

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 17, 33, 9, 100], [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11], list(range(20, 90))]


def greedy(loaded, run, cache_dtype: str) -> list[list[int]]:
    config = EngineConfig(
        ModelConfig("tiny"),
        CacheConfig(block_size=16, num_blocks=256, cache_dtype=cache_dtype),
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
        ExecutorConfig(enforce_eager=False),
    )
    core = EngineCore(loaded, config)
    assert core.runner.kv_caches[0].dtype == (torch.float8_e4m3fn if cache_dtype == "fp8" else loaded.dtype)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(str(i), prompt, params) for i, prompt in enumerate(PROMPTS)]
    tokens = run(core, requests)
    return [tokens[str(i)] for i in range(len(PROMPTS))]


def test_fp8_kv_cache_greedy_tokens_agree_with_bf16(tiny_model, run) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("an e4m3 KV cache needs compute capability 8.9+")
    loaded = tiny_model("cuda", torch.bfloat16)
    want, got = greedy(loaded, run, "auto"), greedy(loaded, run, "fp8")
    agreed = [
        next((i for i, (a, b) in enumerate(zip(w, g, strict=True)) if a != b), len(w))
        for w, g in zip(want, got, strict=True)
    ]
    print(f"fp8 KV cache vs bf16: greedy tokens equal before the first difference {agreed} of {len(want[0])} each")
    assert all(n >= 1 for n in agreed)  # every prompt's first token
    assert sum(agreed) >= 0.75 * sum(len(w) for w in want)
