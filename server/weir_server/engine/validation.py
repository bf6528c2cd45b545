"""Checks a request against what the engine can run; used by the engine and by frontends in other processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from weir_server.engine.types import Constraint, GenerationRequest
from weir_server.errors import InvalidRequestError


class ConstraintChecks(Protocol):
    """What checks a request's output constraint before admission: the engine's `StructuredOutputs` (structured.py),
    or, in front of an engine-core process, a `ConstraintValidator` (constraint_validator.py)."""

    async def prepare(self, constraint: Constraint) -> None:
        """Check it off the event loop (cancellable); raises InvalidRequestError naming the constraint's field."""
        ...

    def validate(self, constraint: Constraint) -> None:
        """Check it, blocking while a new one is checked; raises InvalidRequestError."""
        ...

    def shutdown(self) -> None:
        """Stop the helper processes and threads; waits for none."""
        ...


@dataclass(frozen=True)
class RequestValidator:
    """The limits a request must fit: vocabulary, context length and KV pool; constraints must compile."""

    vocab_size: int
    max_model_len: int
    max_seq_len: int  # min(max_model_len, what the whole KV pool holds)
    structured: ConstraintChecks | None = None

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Raise InvalidRequestError naming the bad field; return the request with max_tokens clamped to the
        context left."""
        params = request.params
        params.validate(self.vocab_size)
        if request.constraint is not None and self.structured is not None:
            self.structured.validate(request.constraint)
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("prompt", "the prompt is empty; at least one token is required")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError("prompt", f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if len(prompt) + 1 > self.max_seq_len:
            limit = (
                f"the model's context length is {self.max_model_len} tokens"
                if self.max_seq_len == self.max_model_len
                else f"the KV cache holds at most {self.max_seq_len} tokens per sequence"
            )
            raise InvalidRequestError(
                "prompt", f"the prompt has {len(prompt)} tokens, but {limit} and at least 1 must be generated"
            )
        room = self.max_seq_len - len(prompt)
        if params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
            request = dataclasses.replace(request, params=params)
        return request
