"""The stop rules of a choice, as pure functions of its state. Stop strings are text: the detokenizer finds them."""

from __future__ import annotations

from weir_server.engine.sequence import Sequence
from weir_server.engine.types import FinishReason


def may_stop(seq: Sequence, index: int) -> bool:
    """Whether `min_tokens` are out with the token at `index`: stop tokens and stop strings count from it on."""
    return index + 1 - seq.num_prompt_tokens >= seq.params.min_tokens


def check_stop(seq: Sequence, index: int) -> FinishReason | None:
    """Why the choice ends with its sampled token at `index` (a later one may already be in flight), or None:
    its output constraint is complete, the token is one of its stop ids, or it reached its length limit."""
    grammar = seq.grammar
    if grammar is not None and grammar.is_terminated:  # complete, and its stop token taken
        return FinishReason.STOP
    if seq.token_ids[index] in seq.stop_token_ids and may_stop(seq, index):
        return FinishReason.STOP
    if index + 1 >= seq.length_limit:  # max_tokens, or the context the engine can hold
        return FinishReason.LENGTH
    return None
