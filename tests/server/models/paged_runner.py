"""Test helper: drives a causal LM through a paged KV cache the way the model runner does, without the engine.

Blocks are handed out from a shuffled free list, so block tables are not contiguous.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from weir_server.layers.attention_metadata import AttentionMetadata


class PagedRunner:
    """Holds one KV cache per layer and each sequence's blocks; `step()` runs one mixed batch."""

    def __init__(self, model: torch.nn.Module, hf_config, block_size: int = 4, num_blocks: int = 256, seed: int = 0):
        self.model = model
        self.block_size = block_size
        params = next(model.parameters())
        num_kv_heads = hf_config.num_key_value_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=params.dtype, device=params.device) for _ in range(hf_config.num_hidden_layers)
        ]
        self.free_blocks = list(range(1, num_blocks))  # block 0 is the padding target of block tables
        random.Random(seed).shuffle(self.free_blocks)
        self.blocks: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run `(seq_id, new_tokens)` for each sequence in one batch; return each one's logits [n_new, vocab]."""
        input_ids, positions, slots, query_lens, context_lens = [], [], [], [], []
        for seq_id, tokens in chunks:
            start = self.num_tokens.get(seq_id, 0)
            end = start + len(tokens)
            blocks = self.blocks.setdefault(seq_id, [])
            while len(blocks) * self.block_size < end:
                blocks.append(self.free_blocks.pop())
            input_ids += tokens
            positions += range(start, end)
            slots += [blocks[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            query_lens.append(len(tokens))
            context_lens.append(end)
            self.num_tokens[seq_id] = end
        device = self.kv_caches[0].device
        max_blocks = max(len(self.blocks[s]) for s, _ in chunks)
        tables = [self.blocks[s] + [0] * (max_blocks - len(self.blocks[s])) for s, _ in chunks]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            block_size=self.block_size,
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
        )
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), self.kv_caches, attn
            )
            logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Prefill all prompts in one batch, then decode them together; the new tokens of each."""
        ids = list(range(1000, 1000 + len(prompts)))
        logits = self.step(list(zip(ids, prompts, strict=True)))
        outputs = [[int(row[-1].argmax())] for row in logits]
        for _ in range(max_new_tokens - 1):
            logits = self.step([(i, [out[-1]]) for i, out in zip(ids, outputs, strict=True)])
            for out, row in zip(outputs, logits, strict=True):
                out.append(int(row[-1].argmax()))
        return outputs


# A Llama layer's Hugging Face parameter names and llama.cpp's GGUF tensor names, for tests that write GGUF files.
LLAMA_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def save_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` made-up words, so the loader finds one next to tiny models."""
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[PAD]"
    )
    tokenizer.save_pretrained(directory)
