"""Constraints compiled once per server (the engine's side: the core's, or that of a server whose core is a thread of
it). A new one is first vetted in a worker process that can be killed (grammar_worker.py) within its time and memory
budget, then compiled here, its cost now known; compiled grammars are kept in an LRU bounded by the memory they hold
(constraint_vetting.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from weir_server.engine.constraint_vetting import (
    Compilation,
    ConstraintVetting,
    GrammarCache,
    constraint_bytes,
    entry_bytes,
)
from weir_server.engine.grammar_worker import Probe
from weir_server.engine.grammars import (
    allowed_row,
    check_startable,
    compile_constraint,
    forbidden_tokens,
    load_xgrammar,
    tokenizer_info,
)
from weir_server.engine.structured_config import StructuredOutputConfig
from weir_server.engine.types import Constraint

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

__all__ = ["Compilation", "ConstraintCompiler", "GrammarCache", "GrammarState", "allowed_row", "constraint_bytes"]

# Choices this short compile in under 10 ms (about 10 us a byte) and `json_object` is one fixed schema: these skip
# the worker. A regex cannot: `[a-z]{1,5000}` is 13 bytes and compiles for 0.8 s.
CHEAP_CHOICE_BYTES = 1024


class ConstraintCompiler(ConstraintVetting["xgr.CompiledGrammar"]):
    """Compiles constraints against one tokenizer, each once at a time, vetting new ones in killable workers;
    keeps what it compiled in a cache bounded by memory."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        config: StructuredOutputConfig | None = None,
    ) -> None:
        super().__init__(stop_token_ids, config)
        xgr = load_xgrammar()
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self._forbidden = forbidden_tokens(tokenizer, self.stop_token_ids)
        self.allowed = allowed_row(vocab_size, self._forbidden)

    def new_state(self, constraint: Constraint) -> GrammarState:
        """A fresh matcher for one choice. Its constraint was vetted at admission (by this server, or by the server
        process in front of an engine-core process), so a cache miss compiles it here without a worker."""
        return GrammarState(load_xgrammar().GrammarMatcher(self.compile(constraint, vetted=True)))

    def _needs_worker(self, constraint: Constraint) -> bool:
        return not _certainly_cheap(constraint)

    def _finish_here(self, constraint: Constraint, probe: Probe | None) -> tuple[xgr.CompiledGrammar, int]:
        compiled = compile_constraint(self._compiler, constraint)
        check_startable(constraint.kind, compiled, self.vocab_size, self.allowed)
        return compiled, entry_bytes(constraint, compiled.memory_size_bytes)

    def _worker_tokenizer(self) -> str:
        return str(self.info.serialize_json())

    def _forbidden_tokens(self) -> Sequence[int]:
        return self._forbidden


class GrammarState:
    """One choice's position in its grammar; advanced with every token the choice accepts."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def _certainly_cheap(constraint: Constraint) -> bool:
    if constraint.kind == "json_object":
        return True
    return constraint.kind == "choice" and constraint_bytes(constraint) <= CHEAP_CHOICE_BYTES
