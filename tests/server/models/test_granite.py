"""Granite (embedding, attention, residual and logit multipliers), loaded by our loader from safetensors,
matches transformers.

transformers 5.x reads no Granite GGUF metadata, so only the safetensors path is checked.
"""

from __future__ import annotations

import pytest
import torch
from family_checks import engine_greedy, hf_greedy
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import AutoModelForCausalLM, GraniteConfig

from weir_server.config import ModelConfig
from weir_server.models.granite import GraniteForCausalLM
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
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # Far from their neutral values (1, 1/sqrt(head_dim), 1, 1), so a multiplier left out changes the logits.
    embedding_multiplier=6.0,
    attention_multiplier=0.03,
    residual_multiplier=0.3,
    logits_scaling=4.0,
)

CONFIGS = {
    "granite-tied": lambda: GraniteConfig(**COMMON, tie_word_embeddings=True),
    "granite-bias-untied": lambda: GraniteConfig(
        **COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False
    ),
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
    hf_model = AutoModelForCausalLM.from_config(CONFIGS[request.param](), dtype=torch.float32).eval()
    with torch.no_grad():  # norm scales start at 1 and biases at 0; random ones show misplaced ones
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)
    loaded = load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))  # parity is checked in fp32
    return hf_model, loaded


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def test_loader_builds_granite_for_its_architecture(models):
    _, loaded = models
    assert loaded.architecture == "GraniteForCausalLM"
    assert isinstance(loaded.model, GraniteForCausalLM)
    assert loaded.task == "generate"
    assert loaded.vocab_size == VOCAB
    assert 2 in loaded.eos_token_ids


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    seqs = [list(p) for p in PROMPTS]
    steps = [
        [(0, seqs[0]), (1, seqs[1]), (2, seqs[2][:7])],
        [(0, [61]), (1, [62]), (2, seqs[2][7:])],
        [(0, [63]), (1, [64]), (2, [65])],
    ]
    history: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunks in steps:
        ours = runner.step(chunks)
        for (seq_id, tokens), logits in zip(chunks, ours, strict=True):
            history[seq_id] += tokens
            expected = hf_logits(hf_model, history[seq_id])[-len(tokens) :]
            torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    # The last prompt shares its first 8 tokens (two blocks) with the second and arrives after it has run.
    late = PROMPTS[1][:8] + [90, 91, 92]
    ours = engine_greedy(loaded, {0: PROMPTS, 2: [late]}, max_tokens=8)
    for prompt, tokens in zip([*PROMPTS, late], ours, strict=True):
        expected = hf_greedy(hf_model, prompt, 8)
        assert tokens[: len(expected)] == expected  # transformers stops early at EOS
