"""What weir.v1.ControlService answers, as plain dataclasses: a server's load, its description and its prefix-cache
events, for routers."""

from __future__ import annotations

from dataclasses import dataclass

from weir.v1 import inference_pb2 as pb
from weir_client.tasks import task_name

CONTROL_SERVICE = "weir.v1.ControlService"
CONTROL_METHODS = ("Abort", "GetLoad", "GetServerInfo")  # idempotent: the client retries them on UNAVAILABLE


@dataclass(frozen=True)
class ModelLoad:
    """One generation model's load as of its engine's last step; the rates cover the last `window_seconds`."""

    model: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    prefix_cache_hit_rate: float
    generation_tokens_per_second: float
    window_seconds: float
    num_preemptions: int

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV blocks held by sequences."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class ServerLoad:
    """Every generation model's load (or the one asked for), and whether the server is draining."""

    models: list[ModelLoad]
    draining: bool


@dataclass(frozen=True)
class ServedModelInfo:
    """How one model is served; equal `tokenizer_digest`s tokenize alike."""

    id: str
    task: str
    max_model_len: int
    block_size: int
    dtype: str
    device: str
    tensor_parallel_size: int
    tokenizer_digest: str


@dataclass(frozen=True)
class ServerInfo:
    """The server's version and its models."""

    version: str
    models: list[ServedModelInfo]


def server_load(message: pb.GetLoadResponse) -> ServerLoad:
    models = [
        ModelLoad(
            model=m.model,
            running=m.running,
            waiting=m.waiting,
            kv_blocks_used=m.kv_blocks_used,
            kv_blocks_total=m.kv_blocks_total,
            block_size=m.block_size,
            prefix_cache_hit_rate=m.prefix_cache_hit_rate,
            generation_tokens_per_second=m.generation_tokens_per_second,
            window_seconds=m.window_seconds,
            num_preemptions=m.num_preemptions,
        )
        for m in message.models
    ]
    return ServerLoad(models, message.draining)


def server_info(message: pb.GetServerInfoResponse) -> ServerInfo:
    models = [
        ServedModelInfo(
            id=m.id,
            task=task_name(m.task),
            max_model_len=m.max_model_len,
            block_size=m.block_size,
            dtype=m.dtype,
            device=m.device,
            tensor_parallel_size=m.tensor_parallel_size,
            tokenizer_digest=m.tokenizer_digest,
        )
        for m in message.models
    ]
    return ServerInfo(message.version, models)


@dataclass(frozen=True)
class BlockStored:
    """Consecutive full KV blocks entered the prefix cache; `parent_hash` is None at the start of a sequence."""

    block_hashes: list[int]
    parent_hash: int | None
    token_count: int


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks left the prefix cache."""

    block_hashes: list[int]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (the start of every snapshot)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class KvEventBatch:
    """One message of WatchKvEvents: a gap in `sequence` means batches were lost (subscribe again)."""

    model: str
    sequence: int
    events: list[KvEvent]


def kv_event_batch(message: pb.WatchKvEventsResponse) -> KvEventBatch:
    events: list[KvEvent] = []
    for event in message.events:
        kind = event.WhichOneof("event")
        if kind == "block_stored":
            stored = event.block_stored
            parent = stored.parent_hash if stored.HasField("parent_hash") else None
            events.append(BlockStored(list(stored.block_hashes), parent, stored.token_count))
        elif kind == "block_removed":
            events.append(BlockRemoved(list(event.block_removed.block_hashes)))
        elif kind == "all_blocks_cleared":
            events.append(AllBlocksCleared())
    return KvEventBatch(message.model, message.sequence, events)
