"""Prefix-cache events: the block manager records every block it caches and evicts, a log replaying them mirrors
its cache after a random workload, and a subscriber that does not read overflows its bounded queue."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import pytest

from weir_server.engine.block_manager import BlockManager, hash_block
from weir_server.engine.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventLog,
    SubscriberOverflowError,
)
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import SamplingParams


def _run(bm: BlockManager, tokens: list[int]) -> None:
    """Admit a sequence (with its cached prefix), compute all of it, commit its blocks and free it."""
    seq = Sequence("r", 0, tokens, SamplingParams())
    bm.admit(seq, bm.lookup_prefix(seq))
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    bm.free(seq)


def _cached_chain(bm: BlockManager) -> set[int]:
    return set(bm.hash_to_block)


def test_stored_blocks_carry_their_chain_and_evictions_are_removed() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    _run(bm, [1, 2, 3, 4, 5])
    events = bm.take_events()
    assert len(events) == 1 and isinstance(events[0], BlockStored)
    stored = events[0]
    assert stored.parent_hash is None and stored.token_count == 4 and len(stored.block_hashes) == 2
    assert set(stored.block_hashes) == _cached_chain(bm)
    _run(bm, [9, 8, 7, 6, 5, 4, 3])  # needs every block: the cached ones are evicted
    events = bm.take_events()
    removed = {h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert removed == set(stored.block_hashes)
    assert bm.take_events() == []


def test_a_log_replaying_the_events_mirrors_the_cache_after_a_random_workload() -> None:
    rng = random.Random(7)
    bm = BlockManager(num_blocks=24, block_size=4)
    log = KvEventLog()
    prefixes = [[rng.randrange(100) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    for _ in range(60):
        tokens = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(1, 30))]
        _run(bm, tokens)
        if rng.random() < 0.5:
            log.publish(bm.take_events())
    log.publish(bm.take_events())
    assert set(log.cached) == _cached_chain(bm)
    assert all(tokens == bm.block_size for _, tokens in log.cached.values())


async def test_a_new_subscriber_starts_from_a_snapshot_of_the_cache() -> None:
    log = KvEventLog()
    log.publish([BlockStored((11, 12), None, 8)])
    subscription, snapshot = log.subscribe()
    assert snapshot.sequence == 1 and isinstance(snapshot.events[0], AllBlocksCleared)
    assert snapshot.events[1:] == (BlockStored((11,), None, 4), BlockStored((12,), 11, 4))
    log.publish([BlockRemoved((12,))])
    batch = await subscription.get()
    assert batch.sequence == 2 and batch.events == (BlockRemoved((12,)),)


async def test_a_subscriber_that_does_not_read_overflows_instead_of_buffering() -> None:
    log = KvEventLog(max_pending=3)
    subscription, _ = log.subscribe()
    for i in range(100):
        log.publish([BlockStored((i,), None, 4)])
    assert subscription.overflowed and subscription.overflow.is_set()
    assert subscription._queue.qsize() <= 1  # what it did not read was dropped
    with pytest.raises(SubscriberOverflowError):
        await asyncio.wait_for(subscription.get(), 5)


def test_block_hashes_are_equal_in_every_process() -> None:
    # Routers compare the hashes of several servers' events: equal prefixes must hash alike in each of them.
    code = "from weir_server.engine.block_manager import hash_block; print(hash_block(hash_block(None, (1, 2)), (3,)))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in "ab"
    }
    assert outputs == {f"{hash_block(hash_block(None, (1, 2)), (3,))}\n"}
