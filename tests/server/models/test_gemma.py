"""Our Gemma 2 and Gemma 3 (text) models, loaded by our loader from safetensors or GGUF, match transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from family_checks import (
    PROMPTS,
    TINY,
    VOCAB,
    assert_chunked_prefill_and_decode_match,
    assert_greedy_matches,
    assert_loaded_as,
    finish_gguf,
    gguf_writer,
    hf_logits,
    models_fixture,
    random_causal_lm,
    run_greedy,
    tiny_engine,
)
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from weir_server.config import ModelConfig
from weir_server.models.gemma import GemmaForCausalLM
from weir_server.models.loader import load_model

COMMON = TINY | dict(
    intermediate_size=96,
    head_dim=16,
    pad_token_id=0,
    sliding_window=6,  # shorter than the prompts: the sliding layers see only part of the context
    query_pre_attn_scalar=24,  # not head_dim, so the attention scale is checked
)

CONFIGS = {
    # Layer 0 slides, layer 1 is global; caps small enough that random weights hit them.
    "gemma2-softcap": lambda: Gemma2Config(**COMMON, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3-local-global-rope": lambda: Gemma3TextConfig(
        **COMMON,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        },
    ),
}


def random_gemma(hf_config) -> torch.nn.Module:
    """A transformers Gemma with random weights, norm offsets included (transformers starts them at zero)."""
    return random_causal_lm(hf_config, norms="offset")


models = models_fixture(CONFIGS, norms="offset")


def test_loader_reports_the_architecture_and_limits(models):
    hf_model, loaded = models
    assert_loaded_as(loaded, hf_model.config.architectures[0], GemmaForCausalLM)


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    assert_chunked_prefill_and_decode_match(hf_model, loaded)


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    engine = tiny_engine(loaded, max_num_batched_tokens=16)  # longer prompts go in chunks
    # The last prompt shares the third's first 12 tokens (three whole blocks) and arrives after it has finished:
    # a prefix hit.
    late = PROMPTS[2][:12] + [30, 31, 32]
    ours = run_greedy(engine, {0: PROMPTS, 16: [late]}, max_tokens=8)
    assert engine.stats().prefix_cache_hit_tokens >= 12
    assert_greedy_matches(hf_model, [*PROMPTS, late], ours, 8)


# --- GGUF: written here with the `gguf` package, read by our loader and by transformers alike. ---


def write_gguf(hf_model, path: Path) -> None:
    """The model's tensors under llama.cpp's names (norm scales stored as 1 + offset, as llama.cpp's converter does)
    and the config keys transformers reads back."""
    import gguf

    config = hf_model.config
    arch = "gemma2" if config.model_type == "gemma2" else "gemma3"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3, 2)
    writer = gguf_writer(path, arch, config, config.head_dim)
    writer.add_sliding_window(config.sliding_window)
    writer.add_rope_freq_base(10000.0)
    written = set()
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert name is not None and name not in written, hf_name
        written.add(name)
        data = tensor.float() + 1.0 if "norm" in hf_name else tensor.float()
        writer.add_tensor(name, data.numpy().astype(np.float32))
    finish_gguf(writer)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gguf_logits_and_greedy_tokens_match_transformers_reading_the_same_file(name, tmp_path):
    hf_config = CONFIGS[name]()
    hf_config.tie_word_embeddings = True  # llama.cpp's Gemma files hold one embedding matrix
    write_gguf(random_gemma(hf_config), tmp_path / "tiny.gguf")
    save_tiny_tokenizer(tmp_path / "tokenizer", VOCAB)
    loaded = load_model(
        ModelConfig(str(tmp_path / "tiny.gguf"), tokenizer=str(tmp_path / "tokenizer"), device="cpu", dtype="float32")
    )
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    assert loaded.architecture == ("Gemma2ForCausalLM" if name.startswith("gemma2") else "Gemma3ForCausalLM")
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    ours = runner.step([(0, PROMPTS[2])])[0]
    torch.testing.assert_close(ours, hf_logits(hf_model, PROMPTS[2]), atol=2e-4, rtol=1e-4)
    generated = PagedRunner(loaded.model, loaded.hf_config, block_size=4).greedy(PROMPTS, max_new_tokens=6)
    assert_greedy_matches(hf_model, PROMPTS, generated, 6)
