"""OLMo 2 (post-norms, q/k norms over all heads), loaded by our loader from safetensors, matches transformers.

transformers 5.x reads no OLMo 2 GGUF metadata, so only the safetensors path is checked.
"""

from __future__ import annotations

from family_checks import (
    PROMPTS,
    TINY,
    assert_chunked_prefill_and_decode_match,
    assert_engine_greedy_matches,
    assert_loaded_as,
    assert_two_tensor_parallel_ranks_match,
    models_fixture,
    random_causal_lm,
)
from transformers import Olmo2Config

from weir_server.models.olmo2 import Olmo2ForCausalLM

COMMON = TINY | dict(intermediate_size=96, pad_token_id=0)

CONFIGS = {
    "olmo2-gqa": lambda: Olmo2Config(**COMMON, tie_word_embeddings=False),
    "olmo2-bias-linear-rope-tied": lambda: Olmo2Config(
        **COMMON,
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
}


models = models_fixture(CONFIGS, norms="scale")


def test_loader_builds_olmo2_for_its_architecture(models):
    _, loaded = models
    assert_loaded_as(loaded, "Olmo2ForCausalLM", Olmo2ForCausalLM)


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    assert_chunked_prefill_and_decode_match(hf_model, loaded)


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    # The last prompt shares its first 8 tokens (two blocks) with the second and arrives after it has run.
    late = PROMPTS[1][:8] + [90, 91, 92]
    assert_engine_greedy_matches(hf_model, loaded, late)


def test_two_tensor_parallel_ranks_match_transformers_with_a_replicated_kv_head(tmp_path):
    """q/k norms span all heads, so each rank's norm needs the other rank's sum of squares; with one KV head
    both ranks hold the same k, and its norm must not count it twice."""
    hf_config = Olmo2Config(**(COMMON | {"num_key_value_heads": 1}), tie_word_embeddings=False)
    assert_two_tensor_parallel_ranks_match(random_causal_lm(hf_config, seed=1, norms="scale"), tmp_path)
