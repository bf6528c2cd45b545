"""Structured-output fixtures: one constraint compiler over the packaged SmolLM2 tokenizer (session-wide, its worker
processes killed at the end)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from structured_support import SMOLLM2_EOS, SMOLLM2_VOCAB_SIZE


@pytest.fixture(scope="session")
def compiler(smollm2_tokenizer: Any) -> Iterator[Any]:
    from weir_server.engine.structured import ConstraintCompiler

    compiler = ConstraintCompiler(smollm2_tokenizer, SMOLLM2_VOCAB_SIZE, (SMOLLM2_EOS,))
    yield compiler
    compiler.shutdown()
