"""LoRA under tensor parallelism on the CPU: two ranks shard each adapter like its layers (B by rows for column-
parallel layers, A by columns for row-parallel ones) and give transformers + peft's greedy tokens; slots swapped
while serving reach the worker too."""

from __future__ import annotations

import dataclasses

import pytest
from lora_helpers import (
    PROMPTS,
    lora_engine_config,
    make_peft_model,
    reference_greedy,
    run_requests,
    save_model,
    tiny_llama,
)

from weir_server.config import ParallelConfig
from weir_server.distributed import parallel_state
from weir_server.engine.core import EngineCore
from weir_server.executor.tp_executor import launch
from weir_server.models.loader import load_model

pytestmark = pytest.mark.timeout(300)


def test_two_ranks_serve_adapters_like_peft(tmp_path):
    hf_model = tiny_llama()
    save_model(hf_model, tmp_path / "base")
    peft_models = {
        "a": make_peft_model(hf_model, tmp_path / "a", rank=8, seed=30),
        "b": make_peft_model(hf_model, tmp_path / "b", rank=4, use_rslora=True, seed=31),
    }
    config = lora_engine_config(tmp_path / "base")
    lora = dataclasses.replace(config.lora, max_loras=1)  # a and b take turns in one slot: swaps reach rank 1
    config = dataclasses.replace(
        config, lora=lora, parallel=ParallelConfig(tensor_parallel_size=2, collective_timeout_s=60)
    )
    executor = launch(config, on_worker_death=lambda reason: None)
    assert executor is not None
    try:
        core = EngineCore(load_model(config.model), config, publisher=executor)
        for name in peft_models:
            core.add_adapter(core.read_adapter(name, str(tmp_path / name)))
        requests = [(PROMPTS[0], "a"), (PROMPTS[1], None), (PROMPTS[2], "b"), (PROMPTS[3], "a")]
        outputs = run_requests(core, requests, max_tokens=6)
    finally:
        executor.shutdown()
    assert not parallel_state.get().is_parallel
    for (prompt, adapter), tokens in zip(requests, outputs, strict=True):
        reference = hf_model if adapter is None else peft_models[adapter]
        assert tokens == reference_greedy(reference, prompt, 6), adapter
