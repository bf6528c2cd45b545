"""Tiny model folders for tests that start real `weir serve` processes (importable from every test folder)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def make_tiny_model(directory: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama config (random weights with --load-format dummy) with MiniLM's tokenizer: loads in ~1 s."""
    directory.mkdir(parents=True, exist_ok=True)
    _tiny_llama_config(30522, 101, 102, 512).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def make_tiny_smollm2(directory: Path, tokenizer: Any) -> Path:
    """The same 2-layer Llama over SmolLM2's tokenizer (its vocabulary, special tokens and chat template), for tests
    that need SmolLM2's tokens but not its weights: it loads in ~1 s where the packaged GGUF takes tens of seconds
    (its config, tokenizer and weights are each read by parsing the whole file). `tokenizer` is SmolLM2's."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    _tiny_llama_config(len(tokenizer), bos, tokenizer.eos_token_id, 2048).save_pretrained(directory)
    return directory


def _tiny_llama_config(vocab_size: int, bos_token_id: int, eos_token_id: int, max_position_embeddings: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip


def save_tiny_llama(directory: Path, vocab_size: int) -> Path:
    """A random tiny Llama (2 layers, grouped-query attention, seed 0) saved by transformers as safetensors, with a
    word-level tokenizer over made-up words ("w3", "w4", ...): for engine, core-process and tensor-parallel tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>").save_pretrained(directory)
