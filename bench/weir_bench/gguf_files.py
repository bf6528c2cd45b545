"""Random GGUF models for `weir bench gguf`: valid packed blocks of each type in Q4_K_M's mix of Q4_K and Q6_K,
a dense Llama or a Qwen3-MoE (its experts stacked per layer, as llama.cpp stores them), written with the `gguf`
package's writer, and a word-level tokenizer beside them so the loader finds one.

The numbers are noise (small scales keep activations finite); only the shapes, types and bytes matter to speed
and memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Byte offsets of each type's float16 fields (d, dmin or m), kept finite and small in random blocks.
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@dataclass(frozen=True)
class GGUFShape:
    """A Llama shape as GGUF metadata names it; `hidden` and `ffn` are multiples of 256 (a K-quant block)."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    rope_base: float
    experts: int = 0  # a Qwen3-MoE: routed experts per layer (0: a dense Llama)
    experts_used: int = 0
    head_dim: int = 0  # Qwen3's, stated in the file (0: hidden / heads)


# What the CPU check writes: a 12-layer model small enough for a laptop, big enough that weights dominate RSS.
CPU_SHAPE = GGUFShape("random-q4km-768", 768, 2048, 12, 12, 4, 32000, 2048, 10000.0)
LLAMA_32_1B = GGUFShape("random-1b-Q4_K_M", 2048, 8192, 16, 32, 8, 128256, 4096, 500000.0)
# A Qwen3-MoE a CPU holds either way: Qwen3-30B-A3B's expert width and head size, a quarter of its experts and width.
CPU_MOE_SHAPE = GGUFShape("random-moe-q4km", 1024, 768, 8, 16, 4, 32000, 4096, 1e6, 32, 8, 128)


def random_rows(qtype: Any, rows: int, cols: int, seed: int = 0, scale: float = 0.01) -> Any:
    """Raw bytes [rows, row_bytes] (a uint8 torch tensor) of random `qtype` blocks (a weir_server GGMLType) whose
    scales are ordinary float16 numbers of about `scale`."""
    import numpy as np
    import torch

    from weir_server.kernels.gguf_dequant import row_bytes

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // qtype.block_size, qtype.type_size), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype.name]:
        scales = np.asarray(rng.standard_normal(raw.shape[0]) * scale, dtype=np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, row_bytes(qtype, cols)))


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` made-up words (ids 1 and 2 are BOS and EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[PAD]"
    )
    tokenizer.save_pretrained(directory)


def write_random_q4_k_m(path: Path, shape: GGUFShape, tokenizer: bool = True) -> Path:
    """A random Llama GGUF at `path` in Q4_K_M's mix: Q4_K, with v and down in Q6_K in every other layer and a
    Q6_K embedding (tied head); with `tokenizer`, a word-level tokenizer of the same vocabulary beside it."""
    import gguf
    import numpy as np

    from weir_server.kernels.gguf_dequant import Q4_K, Q6_K

    path.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        save_word_tokenizer(path.parent, shape.vocab)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(shape.context)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_embedding_length(shape.hidden)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    hidden, ffn = shape.hidden, shape.ffn
    kv_dim = shape.kv_heads * (hidden // shape.heads)
    ones = np.ones(hidden, dtype=np.float32)
    embedding = random_rows(Q6_K, shape.vocab, hidden, 1, 1e-3).numpy()
    writer.add_tensor("token_embd.weight", embedding, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    writer.add_tensor("output_norm.weight", ones)
    for layer in range(shape.layers):
        big = Q6_K if layer % 2 == 0 else Q4_K  # Q4_K_M's "more bits for half of v and down"
        for name, qtype, (n, k) in (
            ("attn_q", Q4_K, (hidden, hidden)),
            ("attn_k", Q4_K, (kv_dim, hidden)),
            ("attn_v", big, (kv_dim, hidden)),
            ("attn_output", Q4_K, (hidden, hidden)),
            ("ffn_gate", Q4_K, (ffn, hidden)),
            ("ffn_up", Q4_K, (ffn, hidden)),
            ("ffn_down", big, (hidden, ffn)),
        ):
            raw = random_rows(qtype, n, k, seed=layer * 10 + len(name), scale=2e-4).numpy()
            writer.add_tensor(f"blk.{layer}.{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType(qtype.id))
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
    _finish(writer)
    return path


def write_random_moe_q4_k_m(path: Path, shape: GGUFShape, tokenizer: bool = True) -> Path:
    """A random Qwen3-MoE GGUF at `path` in Q4_K_M's mix: Q4_K, with v and the experts' down in Q6_K in every
    other layer, and Q6_K embedding and output; q/k norms; `shape.ffn` is each expert's width."""
    import gguf
    import numpy as np

    from weir_server.kernels.gguf_dequant import Q4_K, Q6_K

    path.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        save_word_tokenizer(path.parent, shape.vocab)
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    hidden, width, head_dim = shape.hidden, shape.ffn, shape.head_dim or shape.hidden // shape.heads
    for add, value in (
        (writer.add_context_length, shape.context), (writer.add_block_count, shape.layers),
        (writer.add_feed_forward_length, 3 * hidden), (writer.add_embedding_length, hidden),
        (writer.add_rope_freq_base, shape.rope_base), (writer.add_head_count, shape.heads),
        (writer.add_head_count_kv, shape.kv_heads), (writer.add_key_length, head_dim),
        (writer.add_value_length, head_dim), (writer.add_layer_norm_rms_eps, 1e-6),
        (writer.add_vocab_size, shape.vocab), (writer.add_expert_count, shape.experts),
        (writer.add_expert_used_count, shape.experts_used), (writer.add_expert_feed_forward_length, width),
        (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2),
    ):  # fmt: skip
        add(value)

    def add_rows(name: str, qtype: Any, rows: int, cols: int, seed: int, scale: float = 2e-4) -> None:
        raw = random_rows(qtype, rows, cols, seed, scale).numpy()
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(qtype.id))

    def add_experts(name: str, qtype: Any, rows: int, cols: int, seed: int) -> None:
        raw = np.stack([random_rows(qtype, rows, cols, seed + e, 2e-4).numpy() for e in range(shape.experts)])
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(qtype.id))

    ones = np.ones(hidden, dtype=np.float32)
    add_rows("token_embd.weight", Q6_K, shape.vocab, hidden, 1, 1e-3)
    add_rows("output.weight", Q6_K, shape.vocab, hidden, 2, 1e-3)
    writer.add_tensor("output_norm.weight", ones)
    q_dim, kv_dim = shape.heads * head_dim, shape.kv_heads * head_dim
    for layer in range(shape.layers):
        big = Q6_K if layer % 2 == 0 else Q4_K
        seed = 1000 * (layer + 1)
        for name, qtype, (n, k) in (
            ("attn_q", Q4_K, (q_dim, hidden)), ("attn_k", Q4_K, (kv_dim, hidden)), ("attn_v", big, (kv_dim, hidden)),
            ("attn_output", Q4_K, (hidden, q_dim)),
        ):  # fmt: skip
            add_rows(f"blk.{layer}.{name}.weight", qtype, n, k, seed + len(name))
        router = np.random.default_rng(seed).standard_normal((shape.experts, hidden)).astype(np.float32)
        writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", router)  # F32, as llama.cpp's converter leaves it
        add_experts(f"blk.{layer}.ffn_gate_exps.weight", Q4_K, width, hidden, seed + 100)
        add_experts(f"blk.{layer}.ffn_up_exps.weight", Q4_K, width, hidden, seed + 300)
        add_experts(f"blk.{layer}.ffn_down_exps.weight", big, hidden, width, seed + 500)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", ones)
        for norm in ("attn_q_norm", "attn_k_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(head_dim, dtype=np.float32))
    _finish(writer)
    return path


def _finish(writer: Any) -> None:
    """Write the header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
