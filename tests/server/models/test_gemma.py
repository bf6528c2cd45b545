"""Our Gemma 2 and Gemma 3 (text) models, loaded by our loader from safetensors or GGUF, match transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.models.loader import load_model

VOCAB = 160
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
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

PROMPTS = [
    [5, 17, 33, 9, 100],
    [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11],
    [12, 99, 23, 54, 65, 76, 87, 98, 109, 110, 121, 132, 143, 154, 4, 15, 26],
]


def random_gemma(hf_config) -> torch.nn.Module:
    """A transformers Gemma with random weights, norm offsets included (transformers starts them at zero)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    return model


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def models(request, tmp_path_factory):
    """(transformers model, our LoadedModel) with the same random weights, via save_pretrained."""
    hf_model = random_gemma(CONFIGS[request.param]())
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)
    loaded = load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))  # parity is checked in fp32
    return hf_model, loaded


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_loader_reports_the_architecture_and_limits(models):
    hf_model, loaded = models
    assert loaded.task == "generate"
    assert loaded.architecture == hf_model.config.architectures[0]
    assert loaded.max_model_len == 256
    assert loaded.vocab_size == VOCAB
    assert 2 in loaded.eos_token_ids


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    seqs = [list(p) for p in PROMPTS]
    # Step 1: two whole prompts and a first chunk; step 2: two decodes and the rest (mixed); then decode-only.
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


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    config = EngineConfig(
        model=ModelConfig(loaded.model_id, device="cpu", dtype="float32"),
        cache=CacheConfig(block_size=4, num_blocks=128, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16),  # longer prompts go in chunks
    )
    engine = EngineCore(loaded, config)
    # The last prompt shares the third's first 12 tokens (three whole blocks) and runs after it: a prefix hit.
    prompts = [*PROMPTS, PROMPTS[2][:12] + [30, 31, 32]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    waves = [[0, 1, 2], [3]]
    for wave in waves:
        for i in wave:
            engine.add_request(engine.validate(GenerationRequest(f"r{i}", prompts[i], params)))
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert engine.stats().prefix_cache_hit_tokens >= 12
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf_model, prompt, 8)
        assert tokens[f"r{i}"][: len(expected)] == expected


# --- GGUF: written here with the `gguf` package, read by our loader and by transformers alike. ---


def write_gguf(hf_model, path: Path) -> None:
    """The model's tensors under llama.cpp's names (norm scales stored as 1 + offset, as llama.cpp's converter does)
    and the config keys transformers reads back."""
    import gguf

    config = hf_model.config
    arch = "gemma2" if config.model_type == "gemma2" else "gemma3"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3, 2)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    written = set()
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert name is not None and name not in written, hf_name
        written.add(name)
        data = tensor.float() + 1.0 if "norm" in hf_name else tensor.float()
        writer.add_tensor(name, data.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
    for prompt, tokens in zip(PROMPTS, generated, strict=True):
        expected = hf_greedy(hf_model, prompt, 6)
        assert tokens[: len(expected)] == expected
