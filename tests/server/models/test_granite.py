"""Granite (embedding, attention, residual and logit multipliers), loaded by our loader from safetensors,
matches transformers.

transformers 5.x reads no Granite GGUF metadata, so only the safetensors path is checked.
"""

from __future__ import annotations

from family_checks import (
    PROMPTS,
    TINY,
    assert_chunked_prefill_and_decode_match,
    assert_engine_greedy_matches,
    assert_loaded_as,
    models_fixture,
)
from transformers import GraniteConfig

from weir_server.models.granite import GraniteForCausalLM

COMMON = TINY | dict(
    intermediate_size=96,
    pad_token_id=0,
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


models = models_fixture(CONFIGS, norms="scale")


def test_loader_builds_granite_for_its_architecture(models):
    _, loaded = models
    assert_loaded_as(loaded, "GraniteForCausalLM", GraniteForCausalLM)


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    assert_chunked_prefill_and_decode_match(hf_model, loaded)


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    # The last prompt shares its first 8 tokens (two blocks) with the second and arrives after it has run.
    late = PROMPTS[1][:8] + [90, 91, 92]
    assert_engine_greedy_matches(hf_model, loaded, late)
