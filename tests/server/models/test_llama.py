"""Our Llama-family model, loaded by our loader from safetensors saved by transformers, matches transformers."""

from __future__ import annotations

import pytest
import torch
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from weir_server.config import ModelConfig
from weir_server.models.loader import load_model

VOCAB = 160
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

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

PROMPTS = [
    [5, 17, 33, 9, 100],
    [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11],
    [12, 99, 23, 54, 65, 76, 87, 98, 109, 110, 121, 132, 143, 154, 4, 15, 26],
]


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def models(request, tmp_path_factory):
    """(transformers model, our LoadedModel) with the same random weights, via save_pretrained."""
    torch.manual_seed(0)
    hf_config = CONFIGS[request.param]()
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)
    loaded = load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))  # parity is checked in fp32
    return hf_model, loaded


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def test_loader_reports_the_architecture_and_limits(models):
    hf_model, loaded = models
    assert loaded.task == "generate"
    assert loaded.architecture == hf_model.config.architectures[0]
    assert loaded.max_model_len == 256
    assert loaded.vocab_size == VOCAB
    assert 2 in loaded.eos_token_ids
    assert loaded.dtype == torch.float32


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    seqs = [list(p) for p in PROMPTS]
    # Step 1: two whole prompts and the first chunk of the third. Step 2: two decodes and the rest of the
    # third (a mixed batch). Steps 3-4: decode-only.
    steps = [
        [(0, seqs[0]), (1, seqs[1]), (2, seqs[2][:7])],
        [(0, [61]), (1, [62]), (2, seqs[2][7:])],
        [(0, [63]), (1, [64]), (2, [65])],
        [(0, [66]), (1, [67]), (2, [68])],
    ]
    history: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunks in steps:
        ours = runner.step(chunks)
        for (seq_id, tokens), logits in zip(chunks, ours, strict=True):
            history[seq_id] += tokens
            expected = hf_logits(hf_model, history[seq_id])[-len(tokens) :]
            torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_generate(models):
    hf_model, loaded = models
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    ours = runner.greedy(PROMPTS, max_new_tokens=10)
    for prompt, generated in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected = out[0, len(prompt) :].tolist()
        assert generated[: len(expected)] == expected  # transformers stops early at EOS


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
