"""Fixtures for speculative decoding: the engine tests' tiny random Llama, served with and without speculation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # engine_helpers: the tiny model and run()

from engine_helpers import TINY_VOCAB, tiny_loaded_model  # noqa: E402

from weir_server.models.loader import LoadedModel  # noqa: E402


@pytest.fixture(scope="session")
def tiny_loaded() -> LoadedModel:
    return tiny_loaded_model()


@pytest.fixture(scope="session")
def tiny_loaded_with_words() -> LoadedModel:
    """The tiny model with a word-level tokenizer over its 384 ids ("w0" .. "w383"), so its output has text (stop
    strings) while it still repeats itself the way n-gram lookup needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(TINY_VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return tiny_loaded_model(tokenizer=PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
