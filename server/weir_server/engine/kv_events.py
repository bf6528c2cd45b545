"""Prefix-cache events, as vLLM and SGLang publish them for KV-aware routers: blocks stored (hash chain), blocks
removed (evicted), cache cleared. The block manager records them; each core iteration hands them to the server
(`CoreLoop`), where a `KvEventLog` keeps a mirror of the cache and fans the events out to subscribers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive full blocks of one sequence entered the prefix cache; `parent_hash` is the block before the
    first (None at the start of a prompt)."""

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_count: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the prefix cache (evicted for new ones)."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """The events of one core iteration; `sequence` grows by one per batch, so a gap shows a lost batch."""

    sequence: int
    events: tuple[KvEvent, ...]


class SubscriberOverflowError(Exception):
    """A subscriber fell `max_pending` batches behind: its stream ends rather than buffering without bound."""


class KvEventSubscription:
    """One subscriber's bounded queue of batches; `get` raises SubscriberOverflowError once it overflowed."""

    def __init__(self, max_pending: int) -> None:
        self._queue: asyncio.Queue[KvEventBatch] = asyncio.Queue(max_pending)
        self.overflowed = False
        self.overflow = asyncio.Event()  # set once it overflowed: ends a write the subscriber never reads

    def put(self, batch: KvEventBatch) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.overflowed = True
            self.overflow.set()
            while not self._queue.empty():  # what it did not read is of no use to it any more: free it now
                self._queue.get_nowait()
            self._queue.put_nowait(KvEventBatch(-1, ()))  # wakes a reader blocked in get

    async def get(self) -> KvEventBatch:
        batch = await self._queue.get()
        if self.overflowed:
            raise SubscriberOverflowError("the subscriber did not keep up with the prefix-cache events")
        return batch


class KvEventLog:
    """On the server's event loop: a mirror of the core's prefix cache (hash -> parent, tokens) built from its
    events, and the subscribers they go to. A new subscriber first gets the mirror as one batch (cleared, then
    every cached block), so it needs no history."""

    def __init__(self, max_pending: int = 1024) -> None:
        self.max_pending = max_pending
        self.sequence = 0
        self.cached: dict[int, tuple[int | None, int]] = {}  # block hash -> (parent hash, token count)
        self._subscribers: set[KvEventSubscription] = set()

    @property
    def num_subscribers(self) -> int:
        """Subscriptions open now (a stream the server ended for overflowing is no longer one)."""
        return len(self._subscribers)

    def publish(self, events: list[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                parent, per_block = event.parent_hash, event.token_count // max(len(event.block_hashes), 1)
                for block_hash in event.block_hashes:
                    self.cached[block_hash] = (parent, per_block)
                    parent = block_hash
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    self.cached.pop(block_hash, None)
            else:
                self.cached.clear()
        self.sequence += 1
        batch = KvEventBatch(self.sequence, tuple(events))
        for subscriber in self._subscribers:
            subscriber.put(batch)

    def subscribe(self) -> tuple[KvEventSubscription, KvEventBatch]:
        """A new subscription and the snapshot batch to send it first (numbered as the last batch published)."""
        subscription = KvEventSubscription(self.max_pending)
        self._subscribers.add(subscription)
        snapshot: list[KvEvent] = [AllBlocksCleared()]
        snapshot += [BlockStored((h,), parent, tokens) for h, (parent, tokens) in self.cached.items()]
        return subscription, KvEventBatch(self.sequence, tuple(snapshot))

    def unsubscribe(self, subscription: KvEventSubscription) -> None:
        self._subscribers.discard(subscription)
