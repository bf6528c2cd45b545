"""Test helpers shared by the model-family parity tests: greedy tokens from transformers and from Weir's engine."""

from __future__ import annotations

import torch

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.models.loader import LoadedModel


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation (it may stop early at EOS)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def engine_greedy(loaded: LoadedModel, arrivals: dict[int, list[list[int]]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt through EngineCore with prefix caching, prompts added at the given steps;
    in order of arrival."""
    config = EngineConfig(
        model=ModelConfig(loaded.model_id, device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=128, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_waiting=16),
    )
    engine = EngineCore(loaded, config)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    count, step = 0, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt in arrivals.get(step, []):
            engine.add_request(engine.validate(GenerationRequest(str(count), prompt, params)))
            tokens[str(count)] = []
            count += 1
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        step += 1
    return [tokens[str(i)] for i in range(count)]
