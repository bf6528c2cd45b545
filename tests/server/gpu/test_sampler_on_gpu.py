"""The engine's sampler on a GPU (the Triton kernel, no read-back per step, CUDA graphs, the engine running
ahead): seeded choices repeat whatever else is batched, top_k=1 is greedy, unseeded choices differ."""

from __future__ import annotations

import pytest
import torch

from weir_server.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
PROMPT = list(range(10, 42))
SEEDED = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, top_k=50, seed=5, ignore_eos=True)


@pytest.fixture
def core(tiny_model, make_core):
    return make_core(tiny_model(DEVICE, torch.bfloat16), enforce_eager=False, max_num_seqs=64)


def unseeded(count: int, offset: int = 100) -> list[GenerationRequest]:
    """Requests at temperature 1 with prompts of their own."""
    params = SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True)
    return [GenerationRequest(f"o{i}", list(range(offset + i, offset + i + 40)), params) for i in range(count)]


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch(core, run):
    alone = run(core, [GenerationRequest("s", PROMPT, SEEDED)])
    others = unseeded(31)
    batched = run(core, [*others[:15], GenerationRequest("s", PROMPT, SEEDED), *others[15:]])
    assert batched["s"] == alone["s"]


def test_top_k_one_at_a_high_temperature_gives_the_greedy_tokens(core, run):
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    top1 = SamplingParams(max_tokens=32, temperature=1.5, top_k=1, ignore_eos=True)
    assert run(core, [GenerationRequest("t", PROMPT, top1)]) == run(core, [GenerationRequest("t", PROMPT, greedy)])


def test_unseeded_requests_for_one_prompt_sample_different_tokens(core, run):
    params = SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True)
    tokens = run(core, [GenerationRequest(f"u{i}", PROMPT, params) for i in range(8)])
    assert len({tuple(t) for t in tokens.values()}) > 1
