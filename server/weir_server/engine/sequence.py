"""A choice's state as it moves through the engine: tokens, KV blocks, progress, sampling state, text."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from weir_server.engine.types import FinishReason, SamplingParams, TokenLogprob
from weir_server.executor.batch import PLACEHOLDER

if TYPE_CHECKING:
    import torch

    from weir_server.engine.detokenizer import IncrementalDetokenizer
    from weir_server.engine.lora_manager import LoadedAdapter
    from weir_server.engine.structured import GrammarState

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued, holding KV blocks, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One choice of a request. `token_ids` is prompt + output; the first `num_computed_tokens` have KV.

    A sampled token still on the device holds its slot as a PLACEHOLDER (the core running ahead); its value
    replaces it once read back (`set_token`).
    """

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float = 0.0,
        leader: Sequence | None = None,
        eos_token_ids: Collection[int] = (),
        adapter: LoadedAdapter | None = None,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.arrival_time = arrival_time
        # Siblings of an n>1 request wait for the leader's prefill so they hit its cached prompt blocks.
        self.leader = leader
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.admitted = False
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of the sequence's full blocks (a function of its tokens)
        self.adapter = adapter  # its LoRA adapter; None = the base model
        self.lora_slot = -1  # the device slot of its adapter while it runs; -1 = none (the base model)
        # Seeds its hash chain: blocks computed under one adapter never serve another, nor the base model.
        self.cache_salt: int | None = None if adapter is None else adapter.cache_salt
        self.num_committed_blocks = 0  # leading blocks already offered to the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.generator: torch.Generator | None = None
        self.detokenizer: IncrementalDetokenizer | None = None
        self.grammar: GrammarState | None = None  # the output constraint's state, advanced with each token
        self.prompt_logprobs: list[TokenLogprob] | None = None  # filled chunk by chunk during prefill
        self.prompt_logprobs_sent = False
        # Output not yet handed out: tokens (and their logprobs) since the previous GenerationOutput.
        self.pending_token_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        # Tokens it may reach (prompt + max_tokens, capped by the engine's context): a step running ahead does not
        # schedule a sequence whose token in flight is its last.
        self.length_limit = self.num_prompt_tokens + params.max_tokens
        # The token ids that end it (once min_tokens are out): its own stop ids, and EOS unless ignored.
        eos = () if params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset((*params.stop_token_ids, *eos))

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    def ready_to_admit(self) -> bool:
        """False while the leader of this sibling has not finished its prompt (its blocks are not cached yet)."""
        leader = self.leader
        if leader is None or leader.is_finished:
            return True
        return leader.status is SequenceStatus.RUNNING and leader.num_computed_tokens >= leader.num_prompt_tokens

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Record a sampled token (its KV is computed next step)."""
        self.set_token(self.add_placeholder(), token_id, logprob)

    def add_placeholder(self) -> int:
        """Take the slot of a token being sampled; returns its index for `set_token`."""
        self.token_ids.append(PLACEHOLDER)
        return len(self.token_ids) - 1

    def set_token(self, index: int, token_id: int, logprob: TokenLogprob | None) -> None:
        """Fill a placeholder with the sampled token and queue it for output."""
        if self.first_token_time is None:
            self.first_token_time = time.time()
        self.token_ids[index] = token_id
        self.pending_token_ids.append(token_id)
        if logprob is not None:
            self.pending_logprobs.append(logprob)

    def finish(self, reason: FinishReason, stop_reason: str | None = None, error: str | None = None) -> None:
        token_ids = self.token_ids
        while token_ids and token_ids[-1] == PLACEHOLDER:  # tokens still being sampled are not part of it
            token_ids.pop()
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.error = error
