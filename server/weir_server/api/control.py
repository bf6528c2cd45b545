"""weir.v1.ControlService: Abort, GetLoad, GetServerInfo and WatchKvEvents, for routers and operators.

GetLoad reads the engines' last-step stats (never a round trip to a core), so polling it at 10 Hz or more costs the
engines nothing; Abort ends a request's stream in the engine, whose core frees its KV blocks on its next iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_server.api.errors import CallCancelledError, map_errors
from weir_server.api.model_registry import ServedModel, ServedModels
from weir_server.engine.async_engine import AsyncEngine
from weir_server.engine.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvEventSubscription,
    SubscriberOverflowError,
)
from weir_server.engine.stats import EngineStats
from weir_server.errors import EngineUnavailableError, InvalidRequestError, QueueFullError

MAX_ABORT_IDS = 10_000
LOAD_WINDOW_S = 10.0  # the span GetLoad's rates cover when polled at least this often
_SAMPLE_EVERY_S = 0.5  # at most one kept sample per half second: a 1 kHz poller cannot grow the window's memory
_MODEL_TASKS = {"generate": pb.MODEL_TASK_GENERATE, "embed": pb.MODEL_TASK_EMBED}


class RunningRequests:
    """The Generate calls in flight by the id their caller sees: those whose prompt is still being prepared (their
    task), and those in an engine (their engine request ids: a caller may reuse an id, and the engine gets a suffixed
    one, `InferenceServicer.Generate`)."""

    def __init__(self) -> None:
        self._by_id: dict[str, dict[str, AsyncEngine]] = {}
        self._preparing: dict[str, list[_Preparing]] = {}

    @contextlib.contextmanager
    def preparing(self, request_id: str | None) -> Iterator[None]:
        """Around a call's preparation (tokenizing, chat rendering, compiling its constraint, often on a worker):
        an Abort then cancels it there, and it ends CANCELLED before it reaches an engine. Leave it before any
        await that follows, so the call is always in one of the two places."""
        task = asyncio.current_task()
        if not request_id or task is None:  # an id nobody knows yet cannot be aborted
            yield
            return
        entry = _Preparing(task)
        self._preparing.setdefault(request_id, []).append(entry)
        try:
            yield
        except asyncio.CancelledError:
            if not entry.aborted:
                raise
            task.uncancel()  # the cancel was ours, not the caller's: the call goes on to answer CANCELLED
            raise CallCancelledError(f"request {request_id!r} was aborted by ControlService.Abort") from None
        finally:
            entries = self._preparing.get(request_id, [])
            if entry in entries:
                entries.remove(entry)
                if not entries:
                    del self._preparing[request_id]

    def add(self, request_id: str, engine_request_id: str, engine: AsyncEngine) -> None:
        self._by_id.setdefault(request_id, {})[engine_request_id] = engine

    def remove(self, request_id: str, engine_request_id: str) -> None:
        calls = self._by_id.get(request_id)
        if calls is not None:
            calls.pop(engine_request_id, None)
            if not calls:
                del self._by_id[request_id]

    def abort(self, request_id: str) -> bool:
        """End every call carrying this id (status CANCELLED); whether one was still preparing or in its engine."""
        aborted = False
        for entry in self._preparing.pop(request_id, []):
            entry.aborted = True
            aborted |= entry.task.cancel()  # the work it waits on stops at its next checkpoint
        for engine_request_id, engine in list(self._by_id.pop(request_id, {}).items()):
            error = CallCancelledError(f"request {request_id!r} was aborted by ControlService.Abort")
            aborted |= engine.abort(engine_request_id, error)
        return aborted


@dataclass(eq=False)
class _Preparing:
    """A call whose prompt is being prepared: its task, and whether Abort cancelled it."""

    task: asyncio.Task[Any]
    aborted: bool = False


@dataclass
class LoadWindow:
    """Recent samples of one engine's cumulative counters, so rates cover a window rather than the lifetime."""

    samples: deque[tuple[float, EngineStats]] = field(default_factory=deque)

    def rates(self, now: float, stats: EngineStats) -> tuple[float, float, float]:
        """(prefix-cache hit rate, generated tokens/s, window seconds) up to `stats`, then remember it."""
        samples = self.samples
        # The oldest sample inside the window; with none inside, the newest one (a slow poller still gets rates).
        while len(samples) > 1 and now - samples[1][0] >= LOAD_WINDOW_S:
            samples.popleft()
        if samples:
            then, base = samples[0]
            span = now - then
            queried = stats.prefix_cache_queried_tokens - base.prefix_cache_queried_tokens
            hits = stats.prefix_cache_hit_tokens - base.prefix_cache_hit_tokens
            generated = stats.num_generated_tokens - base.num_generated_tokens
            hit_rate = hits / queried if queried > 0 else 0.0
            tokens_per_s = generated / span if span > 0 else 0.0
        else:
            span, hit_rate, tokens_per_s = 0.0, stats.prefix_cache_hit_rate, 0.0
        if not samples or now - samples[-1][0] >= _SAMPLE_EVERY_S:
            samples.append((now, stats))
        return hit_rate, tokens_per_s, span


class ControlServicer(inference_pb2_grpc.ControlServiceServicer):
    """Every RPC of weir.v1.ControlService over the registry's engines and the servicer's running calls.
    `draining`: whether the server refuses new inference calls."""

    def __init__(self, registry: ServedModels, running: RunningRequests, draining: Callable[[], bool]) -> None:
        self.registry = registry
        self.running = running
        self.draining = draining
        self._windows: dict[str, LoadWindow] = {}
        self._digests: dict[str, str] = {}

    @map_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        ids = request.request_ids
        if len(ids) > MAX_ABORT_IDS:
            raise InvalidRequestError("request_ids", f"at most {MAX_ABORT_IDS} ids per call, got {len(ids)}")
        aborted = [request_id for request_id in dict.fromkeys(ids) if self.running.abort(request_id)]
        return pb.AbortResponse(aborted_request_ids=aborted)

    @map_errors
    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        models = self._generation_models(request.model)
        now = time.monotonic()
        loads = []
        for model in models:
            assert model.generator is not None
            stats = model.generator.stats()
            hit_rate, tokens_per_s, span = self._windows.setdefault(model.id, LoadWindow()).rates(now, stats)
            loads.append(
                pb.ModelLoad(
                    model=model.id,
                    running=stats.num_running,
                    waiting=stats.num_waiting,
                    kv_blocks_used=stats.num_total_blocks - stats.num_free_blocks,
                    kv_blocks_total=stats.num_total_blocks,
                    block_size=stats.block_size,
                    prefix_cache_hit_rate=hit_rate,
                    generation_tokens_per_second=tokens_per_s,
                    window_seconds=span,
                    num_preemptions=stats.num_preemptions,
                )
            )
        return pb.GetLoadResponse(models=loads, draining=self.draining())

    @map_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        if not self.registry.ready:
            raise EngineUnavailableError("the server is still loading its models; retry shortly")
        return pb.GetServerInfoResponse(
            version=importlib.metadata.version("weir-server"),
            models=[self._served_model_info(m) for m in self.registry.models()],
        )

    @map_errors
    async def WatchKvEvents(self, request: pb.WatchKvEventsRequest, context: Any) -> None:
        model = self.registry.get(request.model, "generate")
        engine = model.generator
        if engine is None:
            raise EngineUnavailableError(f"model {model.id!r} has no generation engine")
        subscription, snapshot = engine.kv_events.subscribe()
        try:
            await _write(context, kv_event_batch(snapshot, model.id), subscription)
            while True:
                batch = await subscription.get()
                await _write(context, kv_event_batch(batch, model.id), subscription)
        except SubscriberOverflowError as e:
            limit = engine.kv_events.max_pending
            message = f"{e} ({limit} batches behind); subscribe again for a fresh snapshot"
            raise QueueFullError(message, retry_after_s=0.0) from e
        finally:
            engine.kv_events.unsubscribe(subscription)

    def _generation_models(self, name: str) -> list[ServedModel]:
        if name:
            return [self.registry.get(name, "generate")]
        if not self.registry.ready:
            raise EngineUnavailableError("the server is still loading its models; retry shortly")
        return [m for m in self.registry.models() if m.generator is not None]

    def _served_model_info(self, model: ServedModel) -> pb.ServedModelInfo:
        loaded = model.loaded
        engine = model.generator
        if model.id not in self._digests:  # serializing a large vocabulary takes tens of ms: once per model
            self._digests[model.id] = tokenizer_digest(loaded.tokenizer)
        return pb.ServedModelInfo(
            id=model.id,
            task=_MODEL_TASKS[model.task],
            max_model_len=loaded.max_model_len,
            block_size=engine.config.cache.block_size if engine is not None else 0,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            tensor_parallel_size=engine.config.parallel.tensor_parallel_size if engine is not None else 1,
            tokenizer_digest=self._digests[model.id],
        )


async def _write(context: Any, message: pb.WatchKvEventsResponse, subscription: KvEventSubscription) -> None:
    """Send one message, unless the subscriber overflows first: a client that never reads blocks the write."""
    write = asyncio.ensure_future(context.write(message))
    overflow = asyncio.ensure_future(subscription.overflow.wait())
    try:
        await asyncio.wait({write, overflow}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        overflow.cancel()
    if not write.done():
        write.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await write
        raise SubscriberOverflowError("the subscriber did not read the prefix-cache events")
    write.result()


def kv_event_batch(batch: KvEventBatch, model: str) -> pb.WatchKvEventsResponse:
    """The protobuf of one batch of prefix-cache events."""
    events = []
    for event in batch.events:
        if isinstance(event, BlockStored):
            stored = pb.BlockStored(block_hashes=event.block_hashes, token_count=event.token_count)
            if event.parent_hash is not None:
                stored.parent_hash = event.parent_hash
            events.append(pb.KvEvent(block_stored=stored))
        elif isinstance(event, BlockRemoved):
            events.append(pb.KvEvent(block_removed=pb.BlockRemoved(block_hashes=event.block_hashes)))
        elif isinstance(event, AllBlocksCleared):
            events.append(pb.KvEvent(all_blocks_cleared=pb.AllBlocksCleared()))
    return pb.WatchKvEventsResponse(sequence=batch.sequence, events=events, model=model)


def tokenizer_digest(tokenizer: object) -> str:
    """The SHA-256 of a tokenizer's JSON serialization (a slow tokenizer's sorted vocabulary) as "sha256:<hex>";
    empty without a tokenizer."""
    if tokenizer is None:
        return ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text: str = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))  # type: ignore[attr-defined]  # slow HF tokenizer
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
