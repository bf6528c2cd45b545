"""The float64 attention references against a naive loop over sequences, tokens and heads."""

import math

import pytest
import torch

from weir_server.kernels.decode_attention import paged_decode_attention_ref
from weir_server.kernels.prefill_attention import paged_prefill_attention_ref
from weir_server.kernels.testing import PagedBatch, random_paged_batch


def naive_attention(batch: PagedBatch, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One (token, head) at a time, each key read through the block table by hand."""
    num_heads, head_dim = batch.q.shape[1:]
    num_kv_heads, block_size = batch.kv_cache.shape[3], batch.kv_cache.shape[2]
    out = torch.zeros(batch.q.shape, dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    for i, ctx in enumerate(batch.context_lens.tolist()):
        slots = [(int(batch.block_tables[i, n // block_size]), n % block_size) for n in range(ctx)]
        keys = torch.stack([batch.kv_cache[0, b, o] for b, o in slots]).double()  # [ctx, Hkv, D]
        values = torch.stack([batch.kv_cache[1, b, o] for b, o in slots]).double()
        q_len = starts[i + 1] - starts[i]
        for j in range(q_len):
            pos = ctx - q_len + j
            seen = [n for n in range(pos + 1) if sliding_window is None or pos - n < sliding_window]
            for h in range(num_heads):
                kv_head = h // (num_heads // num_kv_heads)
                q = batch.q[starts[i] + j, h].double()
                scores = [float(q @ keys[n, kv_head]) * scale for n in seen]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, n in zip(weights, seen, strict=True):
                    out[starts[i] + j, h] += w / total * values[n, kv_head]
    return out


HEADS = [(4, 4), (6, 2), (8, 2)]  # GQA ratios 1, 3, 4


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("sliding_window", [None, 7])
def test_decode_ref_matches_naive_loop(num_heads, num_kv_heads, block_size, sliding_window):
    context_lens = [1, 17, 40, 5, 16]
    batch = random_paged_batch(context_lens, [1] * 5, num_heads, num_kv_heads, 16, block_size, seed=block_size)
    scale = 0.3
    got = paged_decode_attention_ref(
        batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, scale, sliding_window
    )
    torch.testing.assert_close(got, naive_attention(batch, scale, sliding_window), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_prefill_ref_matches_naive_loop_for_mixed_chunks(num_heads, num_kv_heads, sliding_window):
    # A whole prompt, a chunk continuing a cached prefix, two decode rows.
    batch = random_paged_batch([9, 33, 20, 1], [9, 5, 1, 1], num_heads, num_kv_heads, 8, block_size=8, seed=3)
    scale = 1 / math.sqrt(8)
    got = paged_prefill_attention_ref(
        batch.q,
        batch.kv_cache,
        batch.block_tables,
        batch.context_lens,
        batch.query_start_loc,
        batch.max_query_len,
        scale,
        sliding_window,
    )
    torch.testing.assert_close(got, naive_attention(batch, scale, sliding_window), rtol=1e-10, atol=1e-10)


def test_prefill_ref_equals_decode_ref_for_one_token_queries():
    batch = random_paged_batch([3, 50, 21], [1, 1, 1], 8, 2, 32, block_size=16, seed=7)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens)
    decode = paged_decode_attention_ref(*args, 0.2, 10)
    prefill = paged_prefill_attention_ref(*args, batch.query_start_loc, 1, 0.2, 10)
    torch.testing.assert_close(decode, prefill, rtol=1e-12, atol=1e-12)


def test_refs_never_read_the_poisoned_padding_block():
    batch = random_paged_batch([5, 12], [5, 2], 4, 2, 16, block_size=8, seed=1)
    out = paged_prefill_attention_ref(
        batch.q,
        batch.kv_cache,
        batch.block_tables,
        batch.context_lens,
        batch.query_start_loc,
        batch.max_query_len,
        0.25,
    )
    assert out.abs().max() < 10  # values are N(0, 1); one poisoned value would dominate


def test_decode_ref_gives_zeros_for_an_empty_padding_row():
    batch = random_paged_batch([4, 1], [1, 1], 4, 4, 8, block_size=8)
    batch.context_lens[1] = 0
    out = paged_decode_attention_ref(batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, 0.3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0
