"""What the model runner reads of a step: scheduled slices of sequences it sees through a small protocol.

The engine's `Sequence` satisfies `RunnerSeq`, and so does `StepSeq`, the stand-in a tensor-parallel worker rebuilds
from the wire; the executor therefore needs nothing from the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload

# A sampled token still on the device: its slot in `token_ids` is taken when the step is launched, so the next
# step can be scheduled before the value is read back; the runner feeds it from the device (`TokenFeed`).
PLACEHOLDER = -1


class TokenIds(Protocol):
    """A sequence's tokens by absolute position: a list, or a window over one step's tokens."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, key: int) -> int: ...

    @overload
    def __getitem__(self, key: slice) -> list[int]: ...


class RunnerSeq(Protocol):
    """What the model runner reads of a sequence."""

    @property
    def seq_id(self) -> int: ...

    @property
    def token_ids(self) -> TokenIds: ...

    @property
    def block_table(self) -> list[int]: ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def wants_prompt_logprobs(self) -> bool: ...

    @property
    def lora_slot(self) -> int:
        """The device slot of its LoRA adapter; -1 = the base model."""
        ...


S = TypeVar("S", bound=RunnerSeq)


class ScheduledSeq(Generic[S]):
    """A sequence and the slice of its uncomputed tokens that runs this step (fixed when scheduled)."""

    __slots__ = ("seq", "num_new_tokens", "start", "do_sample", "num_logits")

    def __init__(self, seq: S, num_new_tokens: int, start: int) -> None:
        self.seq = seq
        self.num_new_tokens = num_new_tokens
        self.start = start  # position of the first token computed
        # The step reaches the sequence's last token, so its next token is sampled.
        self.do_sample = start + num_new_tokens == len(seq.token_ids)
        # Sampled rows whose logits are needed, the last ones of the slice: 1 + the proposed tokens it verifies.
        self.num_logits = 1

    def __repr__(self) -> str:
        return f"ScheduledSeq({self.seq!r}, {self.num_new_tokens}, start={self.start})"


class StepPublisher(Protocol):
    """Rank 0's side of the step channel: every rank must run the same forward passes in the same order."""

    def publish(self, batch: list[ScheduledSeq[Any]]) -> None:
        """Send one step's batch to every other rank (raises if a rank is gone)."""

    def publish_lora(self, slot: int, weights: Any) -> None:
        """Send every other rank a LoRA adapter's weights (`LoRAWeights`, or None to empty it) for a slot."""


class TokenWindow:
    """The tokens a step computes, indexed by absolute position like `Sequence.token_ids`."""

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start = start
        self.tokens = tokens

    def __len__(self) -> int:
        return self.start + len(self.tokens)

    @overload
    def __getitem__(self, key: int) -> int: ...

    @overload
    def __getitem__(self, key: slice) -> list[int]: ...

    def __getitem__(self, key: int | slice) -> int | list[int]:
        if isinstance(key, slice):
            lo = (key.start or 0) - self.start
            hi = len(self.tokens) if key.stop is None else key.stop - self.start
            if lo < 0 or key.step not in (None, 1):
                raise IndexError(f"tokens {key} reach outside this step's window at {self.start}")
            return self.tokens[lo:hi]
        if not self.start <= key < len(self):
            raise IndexError(f"token {key} is outside this step's window at {self.start}")
        return self.tokens[key - self.start]


@dataclass
class StepSeq:
    """A `RunnerSeq` made of one step's tokens: rebuilt on a tensor-parallel worker, or made up to profile a step."""

    seq_id: int
    token_ids: TokenWindow
    block_table: list[int]
    num_prompt_tokens: int
    wants_prompt_logprobs: bool = False
    lora_slot: int = -1
