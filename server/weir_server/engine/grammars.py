"""What Weir asks of xgrammar: compile a constraint, describe a tokenizer, the bitmask row of allowed tokens and
whether any token can begin a grammar. xgrammar is imported on first use and imports torch itself, so a server
process in front of an engine-core process calls these only in its worker processes (grammar_worker.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from weir_server.engine.structured_config import WORKER_MEMORY_FLAG
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerBase

# xgrammar prefixes its messages with a timestamp, the C++ source line and sometimes the failed check.
_LIBRARY_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
OUT_OF_MEMORY = f"needs more memory to compile than this server allows ({WORKER_MEMORY_FLAG})"
UNSTARTABLE = "no token of this model's vocabulary can begin an output it allows"


def load_xgrammar() -> ModuleType:
    """xgrammar, imported on first use: an engine that never sees a constraint runs without it installed."""
    import xgrammar

    return xgrammar


def library_message(error: Exception) -> str:
    """xgrammar's own message, without its log prefix."""
    return _LIBRARY_PREFIX.sub("", str(error).strip()).strip()


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (JSON string escapes are xgrammar's literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def compile_constraint(compiler: xgr.GrammarCompiler, constraint: Constraint) -> xgr.CompiledGrammar:
    """Compile one constraint; raises InvalidRequestError naming its kind with xgrammar's reason."""
    kind, value = constraint.kind, constraint.value
    try:
        if kind == "json_schema":
            assert isinstance(value, str)
            _check_json(value)
            # Compact JSON: free whitespace lets small models ramble spaces until max_tokens.
            return compiler.compile_json_schema(value, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            assert isinstance(value, str)
            return compiler.compile_regex(value)
        if kind == "choice":
            assert isinstance(value, tuple)
            return compiler.compile_grammar(choice_grammar(value))
        if kind == "grammar":
            assert isinstance(value, str)
            return compiler.compile_grammar(value)
        if kind == "structural_tag":
            assert isinstance(value, str)
            return compiler.compile_structural_tag(value)
    except UnicodeDecodeError:  # xgrammar's message itself held broken UTF-8 (seen with fuzzed regexes)
        raise InvalidRequestError(kind, f"is not a valid {kind}") from None
    except RuntimeError as error:
        if "bad_alloc" in str(error):  # a worker's address space is capped
            raise InvalidRequestError(kind, OUT_OF_MEMORY) from None
        raise InvalidRequestError(kind, library_message(error)) from None
    raise InvalidRequestError("constraint", f"unknown constraint kind {kind!r}")


def _check_json(text: str) -> None:
    try:
        json.loads(text)
    except ValueError as error:
        raise InvalidRequestError("json_schema", f"is not valid JSON: {error}") from None


def tokenizer_info(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int]
) -> xgr.TokenizerInfo:
    """xgrammar's view of a tokenizer. The model's vocab size, not the tokenizer's: logits rows may be padded past
    the last real token."""
    info: xgr.TokenizerInfo = load_xgrammar().TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
    )
    return info


def tokenizer_info_json(tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int]) -> str:
    """`tokenizer_info`, serialized as the compile workers take it."""
    return str(tokenizer_info(tokenizer, vocab_size, stop_token_ids).serialize_json())


def forbidden_tokens(tokenizer: PreTrainedTokenizerBase, stop_token_ids: Sequence[int]) -> list[int]:
    """The special tokens other than the stops: never part of a constrained output (xgrammar reads them as text)."""
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    return sorted(special - set(stop_token_ids))


def allowed_row(vocab_size: int, forbidden: Sequence[int]) -> torch.Tensor:
    """One bitmask row (int32 words, bit set = allowed) allowing every token but `forbidden`."""
    row: torch.Tensor = load_xgrammar().allocate_token_bitmask(1, vocab_size)[0]
    for token_id in forbidden:
        if 0 <= token_id < vocab_size:
            clear = ~(1 << (token_id % 32)) & 0xFFFFFFFF
            row[token_id // 32] &= clear - (1 << 32) if clear >= 1 << 31 else clear  # as a signed int32
    return row


def check_startable(kind: str, compiled: xgr.CompiledGrammar, vocab_size: int, allowed: torch.Tensor) -> None:
    """Refuse a constraint no token of this vocabulary can begin (a regex of characters the tokenizer lacks,
    say): otherwise every token would be masked and the request would fail mid-step."""
    xgr = load_xgrammar()
    first = xgr.allocate_token_bitmask(1, vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(first, 0)
    if not bool((first[0] & allowed).any()):
        raise InvalidRequestError(kind, UNSTARTABLE)
