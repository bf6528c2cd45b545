"""The messages between the server process and a core process: one frozen dataclass each, over one pipe.

To the core: `AddRequest`, `AbortRequest`, `LoadAdapter`, `UnloadAdapter`, `StopCore`. From the core: `CoreReady`
once (with the `ModelDescription` of what it loaded), then `CoreOutputs` per step (or per few steps, when the server
reads slower than the core steps), an `AdapterReply` per adapter call, or `CoreFailed` if it cannot start.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from weir_server.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from weir_server.engine.stats import EngineStats
from weir_server.engine.types import AdapterInfo, GenerationOutput, GenerationRequest
from weir_server.errors import InvalidRequestError, NotFoundError, WeirError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from weir_server.models.loader import LoadedModel


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Queue a request the server validated and admitted."""

    request: GenerationRequest


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Cancel a request (its stream was closed)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class LoadAdapter:
    """Read a LoRA adapter from `path` and serve it as `name`; answered by an AdapterReply with `call_id`."""

    call_id: int
    name: str
    path: str


@dataclass(frozen=True, slots=True)
class UnloadAdapter:
    """Stop serving an adapter (its running requests finish first); answered by an AdapterReply."""

    call_id: int
    name: str


@dataclass(frozen=True, slots=True)
class CallError:
    """A WeirError crossing the pipe: its kind, the field it names and its message."""

    kind: str  # "invalid" | "not_found" | "other"
    field: str
    message: str

    @classmethod
    def of(cls, error: WeirError) -> CallError:
        if isinstance(error, InvalidRequestError):
            return cls("invalid", error.field, error.description)
        return cls("not_found" if isinstance(error, NotFoundError) else "other", "", str(error))

    def to_error(self) -> WeirError:
        if self.kind == "invalid":
            return InvalidRequestError(self.field, self.message)
        return NotFoundError(self.message) if self.kind == "not_found" else WeirError(self.message)


@dataclass(frozen=True, slots=True)
class AdapterReply:
    """The outcome of a LoadAdapter or UnloadAdapter call: the loaded adapter, or the error."""

    call_id: int
    info: AdapterInfo | None = None
    error: CallError | None = None


@dataclass(frozen=True, slots=True)
class StopCore:
    """Stop stepping and exit."""


@dataclass(frozen=True)
class ModelDescription:
    """A `LoadedModel` as the server process in front of a core process sees it: the tokenizer and the facts the API
    reports, without the weights, so that process never imports torch (transformers' model config imports it)."""

    tokenizer: PreTrainedTokenizerBase  # pickled with the message: read once, by the core
    model_id: str
    architecture: str
    task: Literal["generate", "embed"]
    max_model_len: int
    vocab_size: int
    dtype: str  # "bfloat16", as torch names it without its "torch." prefix
    device: str
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelDescription:
        """The description of a model the core loaded."""
        return cls(
            loaded.tokenizer,
            loaded.model_id,
            loaded.architecture,
            loaded.task,
            loaded.max_model_len,
            loaded.vocab_size,
            str(loaded.dtype).removeprefix("torch."),
            str(loaded.device),
            loaded.eos_token_ids,
        )


@dataclass(frozen=True, slots=True)
class CoreInfo:
    """What a started core tells its client: the server validates requests against it."""

    max_seq_len: int
    stats: EngineStats
    adapters: tuple[AdapterInfo, ...] = ()  # the LoRA adapters loaded at start
    model: ModelDescription | None = None  # from a core process: what it loaded


@dataclass(frozen=True, slots=True)
class CoreReady:
    """The model is loaded and the core steps."""

    info: CoreInfo


@dataclass(frozen=True, slots=True)
class CoreOutputs:
    """The outputs of one or more steps (`encode_outputs`), the stats after the last of them and the prefix-cache
    events of those steps (`encode_kv_events`)."""

    packed: list[tuple[Any, ...]]
    stats: EngineStats
    kv_events: tuple[tuple[Any, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class CoreFailed:
    """The core could not start."""

    message: str


ToCore = AddRequest | AbortRequest | LoadAdapter | UnloadAdapter | StopCore
FromCore = CoreReady | CoreOutputs | AdapterReply | CoreFailed

# Outputs cross the pipe as plain tuples of their fields: pickling hundreds of dataclasses per step costs the core
# five times as much (0.7 vs 0.14 ms for 512).
_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(GenerationOutput)))


def encode_outputs(outputs: list[GenerationOutput]) -> list[tuple[Any, ...]]:
    """Outputs as tuples of their fields, cheap to pickle."""
    return [_FIELDS(output) for output in outputs]


def decode_outputs(packed: list[tuple[Any, ...]]) -> list[GenerationOutput]:
    """The outputs `encode_outputs` packed."""
    return [GenerationOutput(*fields) for fields in packed]


# Prefix-cache events cross as tuples for the same reason: a frozen slotted dataclass pickles through Python-level
# __getstate__/__setstate__, about 1.5 us each way per event, and sequences decoding together fill their blocks
# together (at 512 streams of equal prompts, 512 events every 16th step: 0.8 ms to pickle, 0.75 to unpickle).
_STORED, _REMOVED, _CLEARED = 0, 1, 2


def encode_kv_events(events: Sequence[KvEvent]) -> tuple[tuple[Any, ...], ...]:
    """Prefix-cache events as tuples of a kind and their fields, cheap to pickle."""
    packed: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, BlockStored):
            packed.append((_STORED, event.block_hashes, event.parent_hash, event.token_count))
        elif isinstance(event, BlockRemoved):
            packed.append((_REMOVED, event.block_hashes))
        else:
            packed.append((_CLEARED,))
    return tuple(packed)


def decode_kv_events(packed: Sequence[tuple[Any, ...]]) -> list[KvEvent]:
    """The events `encode_kv_events` packed."""
    events: list[KvEvent] = []
    for fields in packed:
        kind = fields[0]
        if kind == _STORED:
            events.append(BlockStored(fields[1], fields[2], fields[3]))
        elif kind == _REMOVED:
            events.append(BlockRemoved(fields[1]))
        else:
            events.append(AllBlocksCleared())
    return events
