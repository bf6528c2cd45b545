"""Structured-output fixtures: the packaged SmolLM2 tokenizer and one constraint compiler over it (session-wide,
its worker processes killed at the end)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from structured_support import SMOLLM2_EOS, SMOLLM2_VOCAB_SIZE


@pytest.fixture(scope="session")
def smollm2_tokenizer(packaged_model_paths: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(packaged_model_paths.smollm2_dir), gguf_file=packaged_model_paths.smollm2_gguf
    )


@pytest.fixture(scope="session")
def compiler(smollm2_tokenizer: Any) -> Iterator[Any]:
    from weir_server.engine.structured import ConstraintCompiler

    compiler = ConstraintCompiler(smollm2_tokenizer, SMOLLM2_VOCAB_SIZE, (SMOLLM2_EOS,))
    yield compiler
    compiler.shutdown()
