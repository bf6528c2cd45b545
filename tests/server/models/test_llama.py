"""Our Llama-family model, loaded by our loader from safetensors saved by transformers, matches transformers."""

from __future__ import annotations

import torch
from family_checks import (
    PROMPTS,
    TINY,
    assert_chunked_prefill_and_decode_match,
    assert_greedy_matches,
    assert_loaded_as,
    models_fixture,
)
from paged_runner import PagedRunner
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from weir_server.config import ModelConfig
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import load_model

COMMON = TINY | dict(intermediate_size=96)

CONFIGS = {
    "llama": lambda: LlamaConfig(
        **COMMON,
        head_dim=16,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-linear-tied": lambda: LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "mistral-sliding-window": lambda: MistralConfig(**COMMON, sliding_window=6, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=False),
}


models = models_fixture(CONFIGS)


def test_loader_reports_the_architecture_and_limits(models):
    hf_model, loaded = models
    assert_loaded_as(loaded, hf_model.config.architectures[0], LlamaForCausalLM)
    assert loaded.dtype == torch.float32


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    assert_chunked_prefill_and_decode_match(hf_model, loaded)


def test_greedy_generation_matches_transformers_generate(models):
    hf_model, loaded = models
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    assert_greedy_matches(hf_model, PROMPTS, runner.greedy(PROMPTS, max_new_tokens=10), 10)


def test_dummy_weights_are_deterministic_and_give_finite_logits(models):
    _, loaded = models
    directory = loaded.model_id  # the served name defaults to the spec: here the saved folder
    first = load_model(ModelConfig(directory, load_format="dummy", seed=3, device="cpu"))
    second = load_model(ModelConfig(directory, load_format="dummy", seed=3, device="cpu"))
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    logits = PagedRunner(first.model, first.hf_config).step([(0, PROMPTS[0])])[0]
    assert torch.isfinite(logits).all()
    assert logits.abs().max() < 20
