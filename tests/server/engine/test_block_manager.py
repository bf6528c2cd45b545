"""BlockManager without a model: allocation, prefix hashes and hits, ref counts, eviction."""

from __future__ import annotations

from weir_server.engine.block_manager import BlockManager
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import SamplingParams


def _seq(tokens: list[int], request_id: str = "r", **params) -> Sequence:
    return Sequence(request_id, 0, tokens, SamplingParams(**params))


def _compute(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model computed all of the sequence's tokens."""
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_allocate_grows_block_table_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(list(range(10)))
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    seq.num_computed_tokens = 10
    bm.allocate(seq, 2)  # 12 tokens still fit in 3 blocks
    assert len(seq.block_table) == 3
    seq.num_computed_tokens = 12
    bm.allocate(seq, 1)
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_prefix_hits_cover_full_blocks_only_and_leave_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(10)))
    _compute(bm, first)
    same_prefix = _seq(list(range(9)) + [99])
    assert len(bm.lookup_prefix(same_prefix)) == 2
    identical = _seq(list(range(8)))
    assert len(bm.lookup_prefix(identical)) == 1  # 8 tokens: the second block holds the token to compute
    other = _seq([5] + list(range(1, 10)))
    assert bm.lookup_prefix(other) == []


def test_shared_blocks_are_ref_counted_and_cached_after_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(9)))
    _compute(bm, a)
    b = _seq(list(range(9)))
    hits = bm.lookup_prefix(b)
    assert bm.admit(b, hits) == 8 and b.block_table == a.block_table[:2]
    assert all(bm.blocks[i].ref_count == 2 for i in hits)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    c = _seq(list(range(9)))
    assert bm.lookup_prefix(c) == hits  # still cached while free


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = _seq([1, 2, 3]), _seq([7, 8, 9])
    _compute(bm, old)
    bm.free(old)
    _compute(bm, new)
    bm.free(new)
    filler = _seq([0] * 6)
    bm.allocate(filler, 6)  # the two uncached blocks go first, then the oldest cached one
    assert bm.lookup_prefix(_seq([1, 2, 3])) == [] and bm.lookup_prefix(_seq([7, 8, 9])) != []
    bm.free(filler)
    grab = _seq([5] * 7)
    bm.allocate(grab, 7)
    assert bm.lookup_prefix(_seq([1, 2, 3])) == [] and bm.lookup_prefix(_seq([7, 8, 9])) == []


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    _compute(bm, _seq(list(range(9))))
    assert bm.lookup_prefix(_seq(list(range(9)), prompt_logprobs=1)) == []
