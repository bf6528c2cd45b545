"""Fixed-size KV blocks: block tables, a hash-chained prefix cache of full blocks, ref counts, LRU eviction."""

from __future__ import annotations

from collections import OrderedDict

from weir_server.engine.kv_events import BlockRemoved, BlockStored, KvEvent
from weir_server.engine.sequence import Sequence

# The first block's parent. Not None: hash(None) differs between processes on Python 3.11, and the chain hashes go
# out in prefix-cache events, where equal prefixes must have equal hashes on every server (ints hash alike anywhere).
ROOT_PARENT_HASH = 0


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chain hash of a full block: equal only when every token of the prefix up to it is equal; the same in every
    process."""
    return hash((ROOT_PARENT_HASH if parent_hash is None else parent_hash, token_ids))


class Block:
    """One slot range of the KV cache; `hash` is set once its tokens are computed and registered."""

    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    """Owns the pool of KV blocks. Free blocks stay cached (if hashed) and are evicted least recently freed first."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.events: list[KvEvent] = []  # prefix-cache changes since the last `take_events`

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def take_events(self) -> list[KvEvent]:
        """The prefix-cache events recorded since the last call, oldest first."""
        events, self.events = self.events, []
        return events

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Extend the sequence's hash chain over its first `num_tokens // block_size` blocks."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else seq.cache_salt  # a LoRA adapter's salt keys its first block
            hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
        return hashes

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Block ids caching this sequence's leading full blocks; at least one token is left to compute."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        hits: list[int] = []
        bs = self.block_size
        for i, h in enumerate(self._full_block_hashes(seq, seq.num_tokens - 1)):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether the free pool holds the new blocks plus the cached hits that currently sit in it."""
        needed = self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        reused_free = sum(1 for b in hits if b in self.free_blocks)
        return needed + reused_free <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int]) -> int:
        """Attach cached prefix blocks to a sequence that holds none; return the cached token count."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        cached = len(hits) * self.block_size
        seq.num_computed_tokens = cached
        if self.enable_prefix_caching:
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached
        return cached

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table so it has slots for `num_new_tokens` more computed tokens."""
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks}")
        for _ in range(needed):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the cached content this block held
                if self.hash_to_block.get(block.hash) == block_id:
                    del self.hash_to_block[block.hash]
                    self.events.append(BlockRemoved((block.hash,)))
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        if not self.enable_prefix_caching or num_full <= seq.num_committed_blocks:  # no block completed
            return
        hashes = self._full_block_hashes(seq, seq.num_computed_tokens)
        stored: list[int] = []  # a run of consecutive newly cached blocks: one BlockStored event
        for i in range(seq.num_committed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None or hashes[i] in self.hash_to_block:
                self._stored(stored, hashes, i)
                continue  # already registered, or the same content is cached in another block
            block.hash, block.token_ids = hashes[i], tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self.hash_to_block[block.hash] = block.block_id
            stored.append(block.hash)
        self._stored(stored, hashes, num_full)
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def _stored(self, stored: list[int], hashes: list[int], end: int) -> None:
        """Record the run of blocks ending before block `end` as stored, and start a new run."""
        if stored:
            first = end - len(stored)
            parent = hashes[first - 1] if first > 0 else None
            self.events.append(BlockStored(tuple(stored), parent, len(stored) * self.block_size))
            stored.clear()

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks; tail blocks go first in the eviction order (they are least shareable)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is None:
                    # Uncached blocks hold nothing worth keeping: hand them out before cached ones.
                    self.free_blocks[block_id] = None
                    self.free_blocks.move_to_end(block_id, last=False)
                else:
                    self.free_blocks[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0
