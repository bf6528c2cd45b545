"""Tiny Llama checkpoints on disk for the tensor-parallel tests."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over made-up words, so the loader finds one beside a tiny model."""
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>").save_pretrained(directory)
