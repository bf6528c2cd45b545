"""Structured output with xgrammar: compile constraints once, track each choice's grammar, mask the batch's logits."""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError

if TYPE_CHECKING:
    import xgrammar as xgr

# xgrammar prefixes its messages with a timestamp, the C++ source line and sometimes the failed check.
_LIBRARY_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _xgrammar() -> ModuleType:
    """xgrammar, imported on first use: an engine that never sees a constraint runs without it installed."""
    import xgrammar

    return xgrammar


def library_message(error: Exception) -> str:
    """xgrammar's own message, without its log prefix."""
    return _LIBRARY_PREFIX.sub("", str(error).strip()).strip()


def allowed_row(vocab_size: int, forbidden: Iterable[int]) -> torch.Tensor:
    """One bitmask row (int32 words, bit set = allowed) allowing every token but `forbidden`."""
    row = _xgrammar().allocate_token_bitmask(1, vocab_size)[0]
    for token_id in forbidden:
        if 0 <= token_id < vocab_size:
            clear = ~(1 << (token_id % 32)) & 0xFFFFFFFF
            row[token_id // 32] &= clear - (1 << 32) if clear >= 1 << 31 else clear  # as a signed int32
    return row


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string escapes are xgrammar's literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class ConstraintCompiler:
    """Compiles constraints against one tokenizer, each (kind, value) once: an LRU of compiled grammars."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        cache_size: int = 256,
    ) -> None:
        xgr = _xgrammar()
        # The model's vocab size, not the tokenizer's: logits rows may be padded past the last real token.
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self._cache: OrderedDict[Constraint, Future[xgr.CompiledGrammar]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # Special tokens other than the stops are never part of a constrained output (xgrammar reads them as text).
        special = set(tokenizer.all_special_ids)
        special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
        self.allowed = allowed_row(vocab_size, special - set(self.stop_token_ids))

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar of a constraint; raises InvalidRequestError (naming the kind) for a bad one.
        Concurrent requests for one new constraint wait for a single compilation."""
        with self._lock:
            entry = self._cache.get(constraint)
            owner = entry is None
            if entry is None:
                entry = self._cache[constraint] = Future()
            else:
                self._cache.move_to_end(constraint)
        if owner:
            try:
                compiled = self._compile(constraint)
                self._check_startable(constraint.kind, compiled)
                entry.set_result(compiled)
            except Exception as error:  # re-raised; the waiters get it too
                with self._lock:
                    self._cache.pop(constraint, None)  # a bad constraint is not kept
                entry.set_exception(error)
                raise
            with self._lock:
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return entry.result()

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        kind, value = constraint.kind, constraint.value
        try:
            if kind == "json_schema":
                assert isinstance(value, str)
                _check_json(value)
                # Compact JSON: free whitespace lets small models ramble spaces until max_tokens.
                return self._compiler.compile_json_schema(value, any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "regex":
                assert isinstance(value, str)
                return self._compiler.compile_regex(value)
            if kind == "choice":
                assert isinstance(value, tuple)
                return self._compiler.compile_grammar(choice_grammar(value))
            if kind == "grammar":
                assert isinstance(value, str)
                return self._compiler.compile_grammar(value)
            if kind == "structural_tag":
                assert isinstance(value, str)
                return self._compiler.compile_structural_tag(value)
        except UnicodeDecodeError:  # xgrammar's message itself held broken UTF-8 (seen with fuzzed regexes)
            raise InvalidRequestError(kind, f"is not a valid {kind}") from None
        except RuntimeError as error:
            raise InvalidRequestError(kind, library_message(error)) from None
        raise InvalidRequestError("constraint", f"unknown constraint kind {kind!r}")

    def _check_startable(self, kind: str, compiled: xgr.CompiledGrammar) -> None:
        """Refuse a constraint no token of this vocabulary can begin (a regex of characters the tokenizer lacks,
        say): otherwise every token would be masked and the request would fail mid-step."""
        first = fill_mask([GrammarState(_xgrammar().GrammarMatcher(compiled))], self.vocab_size, self.allowed)
        if not bool(first.bitmask.any()):
            raise InvalidRequestError(kind, "no token of this model's vocabulary can begin an output it allows")

    def new_state(self, constraint: Constraint) -> GrammarState:
        """A fresh matcher for one choice."""
        return GrammarState(_xgrammar().GrammarMatcher(self.compile(constraint)))


def _check_json(text: str) -> None:
    try:
        json.loads(text)
    except ValueError as error:
        raise InvalidRequestError("json_schema", f"is not valid JSON: {error}") from None


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


@dataclass
class TokenMask:
    """The allowed next tokens of a step's constrained rows, packed 32 per int32 (bit set = allowed)."""

    bitmask: torch.Tensor  # [rows of the step, ceil(vocab / 32)] int32 on the CPU
    rows: list[int]  # the constrained rows; the others are left as they are

    def apply(self, logits: torch.Tensor) -> None:
        """Set every disallowed token's logit to -inf, in place, on the logits' device."""
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        _xgrammar().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=self.rows)


def fill_mask(states: Sequence[GrammarState | None], vocab_size: int, allowed: torch.Tensor) -> TokenMask:
    """The mask of a step's rows: each constrained row's grammar, without the forbidden special tokens."""
    rows = [i for i, state in enumerate(states) if state is not None]
    bitmask = _xgrammar().allocate_token_bitmask(len(states), vocab_size)
    for row in rows:
        state = states[row]
        assert state is not None
        state.fill(bitmask, row)
    bitmask[rows] &= allowed
    return TokenMask(bitmask, rows)


class StructuredOutputs:
    """The engine's side of constraints: compile and check them, start a choice's grammar, and fill each step's
    mask on a helper thread while the model runs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        device: torch.device,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
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
                    _xgrammar()
                except ImportError as error:
                    raise InvalidRequestError(
                        "constraint", f"structured output needs the xgrammar package, which this server lacks ({error})"
                    ) from error
                self._compiler = ConstraintCompiler(self._tokenizer, self.vocab_size, self.stop_token_ids)
            return self._compiler

    def validate(self, constraint: Constraint) -> None:
        """Raise InvalidRequestError (naming the constraint's field) unless it compiles; compiled ones are cached."""
        constraint.validate()
        self.compiler.compile(constraint)

    def new_state(self, constraint: Constraint) -> GrammarState:
        """A fresh grammar state for one choice."""
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
        self._pool.shutdown(wait=False, cancel_futures=True)
