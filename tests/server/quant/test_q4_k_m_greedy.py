"""A Q4_K_M-style GGUF (Q4_K, Q5_K and Q6_K, with Q4_0, Q4_1 and Q8_0 in one layer) written from a tiny random
Llama: Weir serving it packed gives the greedy tokens of the same file dequantized and run in float32, by
Weir and by transformers' GGUF loader, and logits within 1e-4 (relative) of the dequantized run."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_blocks import quantize_k
from paged_runner import LLAMA_HF_TO_GGUF, PagedRunner, save_tiny_tokenizer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from weir_server.config import ModelConfig
from weir_server.kernels.gguf_dequant import Q4_K, Q5_K, Q6_K
from weir_server.layers.quantized_linear import GGUFEmbedding, GGUFLinear
from weir_server.models.loader import load_model

VOCAB, HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 256, 512, 4, 2, 2
PROMPTS = [[1, 17, 42, 99, 3, 250, 7], [1, 5, 5, 5]]
NEW_TOKENS = 12
Q = gguf.GGMLQuantizationType
# Q4_K_M's mix (v and down in Q6_K in the first layer), and the legacy types in the second.
TYPES = {
    "token_embd": Q.Q4_K,
    "output": Q.Q6_K,
    "blk.0.attn_q": Q.Q4_K,
    "blk.0.attn_k": Q.Q4_K,
    "blk.0.attn_v": Q.Q6_K,
    "blk.0.attn_output": Q.Q4_K,
    "blk.0.ffn_gate": Q.Q4_K,
    "blk.0.ffn_up": Q.Q4_K,
    "blk.0.ffn_down": Q.Q6_K,
    "blk.1.attn_q": Q.Q4_0,
    "blk.1.attn_k": Q.Q4_1,
    "blk.1.attn_v": Q.Q8_0,
    "blk.1.attn_output": Q.Q5_K,
    "blk.1.ffn_gate": Q.Q4_K,
    "blk.1.ffn_up": Q.Q5_K,
    "blk.1.ffn_down": Q.Q4_K,
}
_K = {Q.Q4_K: Q4_K, Q.Q5_K: Q5_K, Q.Q6_K: Q6_K}


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script interleaves q/k rows for its rope; transformers undoes it on load."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weights.shape)


def quantize(weights: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return quantize_k(weights, _K[qtype]) if qtype in _K else gguf.quants.quantize(weights, qtype)


@pytest.fixture(scope="module")
def q4_k_m_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, LlamaConfig]:
    """(the .gguf file, a folder with its tokenizer, the model's config)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.08,  # logits far apart: greedy choices are not near-ties
    )
    state = AutoModelForCausalLM.from_config(config).state_dict()
    folder = tmp_path_factory.mktemp("q4-k-m")
    save_tiny_tokenizer(folder, VOCAB)
    path = folder / "tiny-Q4_K_M.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_embedding_length(HIDDEN)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    for layer in range(LAYERS):
        names |= {f"model.layers.{layer}.{hf}.weight": f"blk.{layer}.{ours}" for hf, ours in LLAMA_HF_TO_GGUF.items()}
    for hf_name, ours in names.items():
        weights = state[hf_name].float().numpy()
        if ours.endswith("attn_q"):
            weights = llama_cpp_permute(weights, HEADS)
        elif ours.endswith("attn_k"):
            weights = llama_cpp_permute(weights, KV_HEADS)
        qtype = TYPES.get(ours)
        if qtype is None:
            writer.add_tensor(f"{ours}.weight", weights)
        else:
            writer.add_tensor(f"{ours}.weight", quantize(weights, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, folder, config


@pytest.fixture(scope="module")
def served(q4_k_m_file):
    path, folder, _ = q4_k_m_file
    return load_model(ModelConfig(str(path), device="cpu", dtype="float32", tokenizer=str(folder), keep_quantized=True))


@pytest.fixture(scope="module")
def dequantized(q4_k_m_file, tmp_path_factory):
    """transformers' float32 model of the file, and Weir running the same float32 weights from safetensors."""
    path, folder, config = q4_k_m_file
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name, dtype=torch.float32).eval()
    saved = tmp_path_factory.mktemp("dequantized")
    config.save_pretrained(saved)  # transformers will not save a model it loaded from GGUF; its weights, then
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, saved / "model.safetensors")
    save_tiny_tokenizer(saved, VOCAB)
    return hf_model, load_model(ModelConfig(str(saved), device="cpu", dtype="float32"))


def greedy(loaded) -> list[list[int]]:
    return PagedRunner(loaded.model, loaded.hf_config).greedy(PROMPTS, max_new_tokens=NEW_TOKENS)


def test_the_file_mixes_the_q4_k_m_types_and_weir_keeps_them_packed(q4_k_m_file, served):
    reader = gguf.GGUFReader(q4_k_m_file[0])
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
    model = served.model
    assert isinstance(model.model.embed_tokens, GGUFEmbedding) and isinstance(model.lm_head, GGUFLinear)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert [p.rows for p in qkv.parts] == [HIDDEN + HIDDEN // 2, HIDDEN // 2]  # q+k in Q4_K, v in Q6_K
    held = sum(t.numel() * t.element_size() for t in (*model.buffers(), *model.parameters()))
    assert held < 1.5 * q4_k_m_file[0].stat().st_size  # float32 scales here; a bf16 model holds less


def test_greedy_tokens_equal_weir_and_transformers_on_the_dequantized_file(served, dequantized):
    hf_model, weir_float = dequantized
    ours = greedy(served)
    assert ours == greedy(weir_float)
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + tokens[:-1]])).logits[0]
        assert logits[len(prompt) - 1 :].argmax(-1).tolist() == tokens


def test_prompt_logits_are_within_1e_4_of_the_dequantized_run(served, dequantized):
    _, weir_float = dequantized
    chunks = list(enumerate(PROMPTS))
    packed = PagedRunner(served.model, served.hf_config).step(chunks)
    floats = PagedRunner(weir_float.model, weir_float.hf_config).step(chunks)
    for got, want in zip(packed, floats, strict=True):
        assert ((got - want).norm() / want.norm()).item() < 1e-4
