"""Phi-3 / Phi-4-mini (fused q/k/v and gate/up in the checkpoint, LongRoPE, partial rotary, sliding window),
loaded by our loader from safetensors and from GGUF, matches transformers."""

from __future__ import annotations

import numpy as np
import torch
from family_checks import (
    PROMPTS,
    TINY,
    VOCAB,
    assert_chunked_prefill_and_decode_match,
    assert_engine_greedy_matches,
    assert_greedy_matches,
    assert_loaded_as,
    assert_two_tensor_parallel_ranks_match,
    finish_gguf,
    gguf_writer,
    models_fixture,
    random_causal_lm,
)
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import AutoModelForCausalLM, Phi3Config
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from weir_server.config import ModelConfig
from weir_server.layers.rotary import get_rope
from weir_server.models.loader import load_model
from weir_server.models.phi3 import Phi3ForCausalLM

ORIGINAL_MAX = 32  # LongRoPE's pretraining length; the parity prompts stay below it
COMMON = TINY | dict(intermediate_size=96, pad_token_id=0)


def longrope_config() -> Phi3Config:
    """Phi-4-mini's shape in small: 3/4 of each 16-wide head rotates (6 frequencies), LongRoPE, tied embeddings."""
    return Phi3Config(
        **COMMON,
        partial_rotary_factor=0.75,
        original_max_position_embeddings=ORIGINAL_MAX,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        },
        tie_word_embeddings=True,
    )


CONFIGS = {
    "phi4-mini-longrope-partial-rotary-tied": longrope_config,
    "phi3-sliding-window": lambda: Phi3Config(**COMMON, sliding_window=6, tie_word_embeddings=False),
}


models = models_fixture(CONFIGS, norms="scale")


def test_loader_builds_phi3_for_its_architecture(models):
    _, loaded = models
    assert_loaded_as(loaded, "Phi3ForCausalLM", Phi3ForCausalLM)


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    assert_chunked_prefill_and_decode_match(hf_model, loaded)


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    # The last prompt shares its first 8 tokens (two blocks) with the second and arrives after it has run.
    late = PROMPTS[1][:8] + [90, 91, 92]
    assert_engine_greedy_matches(hf_model, loaded, late)


def test_longrope_uses_short_factors_below_the_pretraining_length_and_long_ones_past_it():
    config = longrope_config()
    hf_rope = Phi3RotaryEmbedding(config)
    ours = get_rope(config, head_dim=16)
    assert ours.rotary_dim == 12
    x = torch.zeros(1, dtype=torch.float32)
    for length in (ORIGINAL_MAX, 2 * ORIGINAL_MAX):  # transformers picks the factors by the sequence length
        positions = torch.arange(length)
        hf_cos, hf_sin = hf_rope(x, positions[None])
        cos, sin = ours(positions, torch.float32)
        compared = slice(0, length) if length <= ORIGINAL_MAX else slice(ORIGINAL_MAX, length)
        torch.testing.assert_close(cos[compared, 0], hf_cos[0, compared, :6])
        torch.testing.assert_close(sin[compared, 0], hf_sin[0, compared, :6])


def test_longrope_position_table_for_the_fused_kernel_matches_the_torch_path():
    ours = get_rope(longrope_config(), head_dim=16)
    table = ours.cos_sin_cache(torch.device("cpu"))
    cos, sin = ours(torch.arange(table.shape[0]), torch.float32)
    torch.testing.assert_close(table, torch.cat((cos[:, 0], sin[:, 0]), dim=-1))


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",  # gate and up, fused like the safetensors checkpoint
    "mlp.down_proj": "ffn_down",
}


def write_phi3_gguf(hf_model, path) -> None:
    """The model as an fp32 GGUF of llama.cpp's `phi3` layout (metadata transformers maps to a Phi3Config)."""
    config = hf_model.config
    writer = gguf_writer(path, "phi3", config)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)  # else transformers assumes Phi-3's 32000, outside this vocabulary
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    for i in range(config.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}" for hf, ours in GGUF_NAMES.items()}
    state = hf_model.state_dict()
    for hf_name, gguf_name in names.items():
        writer.add_tensor(f"{gguf_name}.weight", state[hf_name].numpy().astype(np.float32))
    finish_gguf(writer)


def test_gguf_logits_and_greedy_tokens_match_transformers_loading_the_same_file(tmp_path):
    hf_model = random_causal_lm(Phi3Config(**COMMON, tie_word_embeddings=False), seed=1, norms="scale")
    write_phi3_gguf(hf_model, tmp_path / "tiny-phi3.gguf")
    tokenizer_dir = tmp_path / "tokenizer"
    save_tiny_tokenizer(tokenizer_dir, VOCAB)
    loaded = load_model(
        ModelConfig(str(tmp_path / "tiny-phi3.gguf"), device="cpu", dtype="float32", tokenizer=str(tokenizer_dir))
    )
    assert loaded.architecture == "Phi3ForCausalLM"
    hf_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny-phi3.gguf", dtype=torch.float32)
    assert_chunked_prefill_and_decode_match(hf_gguf.eval(), loaded)
    ours = PagedRunner(loaded.model, loaded.hf_config, block_size=4).greedy(PROMPTS, max_new_tokens=8)
    assert_greedy_matches(hf_gguf, PROMPTS, ours, 8)


def test_two_tensor_parallel_ranks_cut_the_fused_checkpoint_tensors_per_rank(tmp_path):
    """Each rank reads its own heads out of the fused q/k/v rows and its own columns out of the fused gate/up
    rows; with one KV head both ranks hold the same k and v."""
    hf_config = longrope_config()
    hf_config.num_key_value_heads = 1
    assert_two_tensor_parallel_ranks_match(random_causal_lm(hf_config, seed=2, norms="scale"), tmp_path)
