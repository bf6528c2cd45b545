"""Constraints in a server process in front of an engine-core process: vetted, never compiled here. Each new one is
compiled in a worker process (it compiles, within the limits, and some token can begin it) and the verdict cached;
the core compiles it again for itself. Neither xgrammar nor torch is imported in this process: the workers, and a
helper process that describes the tokenizer to them once, import both."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from weir_server.engine.constraint_vetting import ConstraintVetting, await_compilation, entry_bytes
from weir_server.engine.grammar_worker import Probe, tokenizer_info_elsewhere
from weir_server.engine.grammars import forbidden_tokens
from weir_server.engine.structured_config import StructuredOutputConfig
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ConstraintValidator(ConstraintVetting[Probe]):
    """The constraint checks of a server process in front of an engine-core process: each new constraint vetted in a
    worker, the verdicts cached. What `StructuredOutputs` is to a server whose core is a thread of it."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        config: StructuredOutputConfig | None = None,
    ) -> None:
        super().__init__(stop_token_ids, config)
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size

    async def prepare(self, constraint: Constraint) -> None:
        """Vet a constraint before admission, off the event loop; cached verdicts return at once. Raises
        InvalidRequestError naming the constraint's field and the limit it broke."""
        if self._tokenizer is None:
            raise InvalidRequestError("constraint", "this model has no tokenizer, so output cannot be constrained")
        if self.cached(constraint) is None:  # the first one describes the tokenizer in a worker: seconds
            compilation = await asyncio.to_thread(self.start, constraint)
        else:
            compilation = self.start(constraint)
        await await_compilation(compilation)

    def validate(self, constraint: Constraint) -> None:
        """Raise InvalidRequestError unless the constraint passes its vetting; blocks while a new one is vetted."""
        if self._tokenizer is None:
            raise InvalidRequestError("constraint", "this model has no tokenizer, so output cannot be constrained")
        self.compile(constraint)

    def _finish_here(self, constraint: Constraint, probe: Probe | None) -> tuple[Probe, int]:
        assert probe is not None  # every constraint goes to a worker
        return probe, entry_bytes(constraint)

    def _worker_tokenizer(self) -> str:
        assert self._tokenizer is not None
        return tokenizer_info_elsewhere(self._tokenizer, self.vocab_size, self.stop_token_ids)

    def _forbidden_tokens(self) -> Sequence[int]:
        assert self._tokenizer is not None
        return forbidden_tokens(self._tokenizer, self.stop_token_ids)
