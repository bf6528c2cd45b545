"""Tiny model folders for tests that start real `weir serve` processes (importable from every test folder)."""

from __future__ import annotations

import shutil
from pathlib import Path


def make_tiny_model(directory: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama config (random weights with --load-format dummy) with MiniLM's tokenizer: loads in ~1 s."""
    from transformers import LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=101, eos_token_id=102,
        tie_word_embeddings=True,
    ).save_pretrained(directory)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory
