"""Fixtures for engine tests: a tiny random LlamaForCausalLM and the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import TINY_VOCAB, tiny_loaded_model

from weir_server.models.loader import LoadedModel


@pytest.fixture(scope="session")
def tiny_loaded() -> LoadedModel:
    return tiny_loaded_model()


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="session")
def tiny_loaded_with_tokenizer(smollm_tokenizer) -> LoadedModel:
    """The tiny model over SmolLM2's vocabulary, so its output can be detokenized."""
    return tiny_loaded_model(tokenizer=smollm_tokenizer, vocab_size=len(smollm_tokenizer))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


__all__ = ["TINY_VOCAB"]
