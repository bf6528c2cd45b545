"""Checks a request against what the engine can run; used by the engine and by frontends in other processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weir_server.engine.types import GenerationRequest
from weir_server.errors import InvalidRequestError

if TYPE_CHECKING:
    from weir_server.engine.structured import StructuredOutputs


@dataclass(frozen=True)
class RequestValidator:
    """The limits a request must fit: vocabulary, context length and KV pool; constraints must compile."""

    vocab_size: int
    max_model_len: int
    max_seq_len: int  # min(max_model_len, what the whole KV pool holds)
    structured: StructuredOutputs | None = None

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
