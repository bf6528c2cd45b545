"""Structured output with xgrammar: the engine's side. Constraints are compiled once (grammar_compiler.py, new ones
vetted in killable worker processes), each choice tracks its grammar, and each step's logits are masked. A server
process in front of an engine-core process only vets them (constraint_validator.ConstraintValidator), without torch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from weir_server.engine.constraint_vetting import await_compilation
from weir_server.engine.grammar_compiler import ConstraintCompiler, GrammarState
from weir_server.engine.grammars import allowed_row, choice_grammar, library_message, load_xgrammar
from weir_server.engine.structured_config import StructuredOutputConfig
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError

__all__ = [
    "ConstraintCompiler",
    "GrammarState",
    "StructuredOutputConfig",
    "StructuredOutputs",
    "TokenMask",
    "allowed_row",
    "choice_grammar",
    "fill_mask",
    "library_message",
]


@dataclass
class TokenMask:
    """The allowed next tokens of a step's constrained rows, packed 32 per int32 (bit set = allowed)."""

    bitmask: torch.Tensor  # [rows of the step, ceil(vocab / 32)] int32 on the CPU
    rows: list[int]  # the constrained rows; the others are left as they are

    def apply(self, logits: torch.Tensor) -> None:
        """Set every disallowed token's logit to -inf, in place, on the logits' device."""
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        load_xgrammar().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=self.rows)


def fill_mask(states: Sequence[GrammarState | None], vocab_size: int, allowed: torch.Tensor) -> TokenMask:
    """The mask of a step's rows: each constrained row's grammar, without the forbidden special tokens."""
    rows = [i for i, state in enumerate(states) if state is not None]
    bitmask = load_xgrammar().allocate_token_bitmask(len(states), vocab_size)
    for row in rows:
        state = states[row]
        assert state is not None
        state.fill(bitmask, row)
    bitmask[rows] &= allowed
    return TokenMask(bitmask, rows)


class StructuredOutputs:
    """The engine's side of constraints: check and compile them before admission, start a choice's grammar, and
    fill each step's mask on a helper thread while the model runs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        device: torch.device,
        config: StructuredOutputConfig | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.config = config or StructuredOutputConfig()
        self._pin = device.type == "cuda"
        self._compiler: ConstraintCompiler | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weir-grammar")  # no thread until used

    @property
    def compiler(self) -> ConstraintCompiler:
        """Built on first use: most servers never see a constraint."""
        with self._lock:
            if self._compiler is None:
                if self._tokenizer is None:
                    raise InvalidRequestError(
                        "constraint", "this model has no tokenizer, so output cannot be constrained"
                    )
                try:
                    load_xgrammar()
                except ImportError as error:
                    raise InvalidRequestError(
                        "constraint", f"structured output needs the xgrammar package, which this server lacks ({error})"
                    ) from error
                self._compiler = ConstraintCompiler(self._tokenizer, self.vocab_size, self.stop_token_ids, self.config)
            return self._compiler

    async def prepare(self, constraint: Constraint) -> None:
        """Check and compile a constraint before admission, off the event loop; cached ones return at once.
        Cancelling the caller (its client gone or past its deadline) ends the compile unless another request
        waits for it. Raises InvalidRequestError naming the constraint's field and the limit it broke."""
        if self._compiler is None:  # built on a thread: reading the tokenizer's vocabulary takes a while
            await asyncio.to_thread(getattr, self, "compiler")
        await await_compilation(self.compiler.start(constraint))

    def validate(self, constraint: Constraint) -> None:
        """Raise InvalidRequestError (naming the constraint's field) unless it compiles; blocks while a new one
        compiles (prefer `prepare`, which can be cancelled). Compiled ones are cached."""
        self.compiler.compile(constraint)

    def new_state(self, constraint: Constraint) -> GrammarState:
        """A fresh grammar state for one choice. The constraint was vetted at admission (by this server, or by the
        server process in front of an engine-core process), so a cache miss compiles it here without a worker."""
        return self.compiler.new_state(constraint)

    def submit(self, states: Sequence[GrammarState | None]) -> Future[TokenMask] | None:
        """Start filling the step's mask on the helper thread; None when no row is constrained."""
        if all(state is None for state in states):
            return None
        return self._pool.submit(self._fill, list(states))

    def _fill(self, states: list[GrammarState | None]) -> TokenMask:
        mask = fill_mask(states, self.vocab_size, self.compiler.allowed)
        if self._pin:  # pinned memory lets the copy to the GPU run asynchronously
            mask.bitmask = mask.bitmask.pin_memory()
        return mask

    def shutdown(self) -> None:
        """Kill the compile workers and stop the mask thread; waits for neither."""
        if self._compiler is not None:
            self._compiler.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)
