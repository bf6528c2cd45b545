"""Tiny Llama checkpoints on disk for the tensor-parallel tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def save_tiny_llama(directory: Path, vocab_size: int) -> Path:
    """A random tiny Llama saved by transformers (safetensors, grouped-query attention) with a word tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    save_word_tokenizer(directory, vocab_size)
    return directory


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over made-up words, so the loader finds one beside a tiny model."""
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>").save_pretrained(directory)
