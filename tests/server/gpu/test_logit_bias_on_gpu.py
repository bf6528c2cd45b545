"""logit_bias on CUDA: the GPU sampler sees the biased logits (a -100 ban holds under greedy and sampling), and the
engine running ahead gives the same tokens as reading each step back first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
from weir_server.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.gpu


def _request(request_id: str, prompt_seed: int, **params: Any) -> GenerationRequest:
    prompt = torch.randint(2, 300, (6,), generator=torch.Generator().manual_seed(prompt_seed)).tolist()
    return GenerationRequest(request_id, prompt, SamplingParams(max_tokens=8, ignore_eos=True, **params))


def _core(loaded: Any, run_ahead: bool) -> Any:
    from weir_server.engine.core import EngineCore

    config = EngineConfig(
        ModelConfig("tiny", device="cuda"),
        CacheConfig(block_size=16, num_blocks=256),
        SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512),
        ExecutorConfig(run_ahead=run_ahead, cuda_graph_max_batch=8),
    )
    return EngineCore(loaded, config)


def test_bias_bans_and_forces_tokens_with_and_without_running_ahead(
    tiny_model: Callable[..., Any], run: Callable[[Any, list[GenerationRequest]], dict[str, list[int]]]
) -> None:
    loaded = tiny_model("cuda")
    requests = [
        _request("ban", 1, temperature=0.0, logit_bias=((5, -100.0), (6, -100.0))),
        _request("force", 2, temperature=0.0, logit_bias=((11, 100.0),)),
        _request("plain", 3, temperature=0.0),
        _request("sampled", 4, temperature=1.0, seed=1, logit_bias=((13, 100.0),)),
        _request("sampled-ban", 5, temperature=1.0, top_p=0.9, seed=2, logit_bias=((7, -100.0),)),
    ]
    ahead = run(_core(loaded, True), requests)
    read_back = run(_core(loaded, False), requests)
    assert ahead == read_back
    assert ahead["force"] == [11] * 8 and ahead["sampled"] == [13] * 8
    assert not {5, 6} & set(ahead["ban"]) and 7 not in ahead["sampled-ban"]
