"""The batched torch paged-attention path against a naive per-sequence float64 reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from weir_server.layers.attention import PagedAttention, paged_attention_torch, write_kv_cache
from weir_server.layers.attention_metadata import AttentionMetadata

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 16


def build_batch(query_lens: list[int], context_lens: list[int], block_size: int, num_blocks: int, seed: int):
    """Random K/V for every context token, stored in shuffled blocks; returns the pieces of one step."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    kv_cache = torch.randn(2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    tables, slots, full_keys, full_values = [], [], [], []
    for q, c in zip(query_lens, context_lens, strict=True):
        blocks = [free.pop() for _ in range(math.ceil(c / block_size))]
        tables.append(blocks)
        positions = range(c)
        seq_slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in positions])
        slots.append(seq_slots[c - q :])
        full_keys.append(torch.randn(c, NUM_KV_HEADS, HEAD_DIM, generator=gen))
        full_values.append(torch.randn(c, NUM_KV_HEADS, HEAD_DIM, generator=gen))
        # Tokens cached by earlier steps are already in place; this step's are written by the layer.
        flat_k = kv_cache[0].view(-1, NUM_KV_HEADS, HEAD_DIM)
        flat_v = kv_cache[1].view(-1, NUM_KV_HEADS, HEAD_DIM)
        flat_k[seq_slots[: c - q]] = full_keys[-1][: c - q]
        flat_v[seq_slots[: c - q]] = full_values[-1][: c - q]
    max_blocks = max(len(t) for t in tables)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    attn = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        block_size=block_size,
        query_lens_cpu=list(query_lens),
        context_lens_cpu=list(context_lens),
    )
    new_keys = torch.cat([k[c - q :] for k, q, c in zip(full_keys, query_lens, context_lens, strict=True)])
    new_values = torch.cat([v[c - q :] for v, q, c in zip(full_values, query_lens, context_lens, strict=True)])
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen)
    return query, new_keys, new_values, kv_cache, attn, full_keys, full_values


def reference_attention(query, full_keys, full_values, query_lens, context_lens, scale, sliding_window):
    """Token by token in float64: query j of a sequence sits at position context_len - query_len + j."""
    out = []
    start = 0
    group = NUM_HEADS // NUM_KV_HEADS
    for keys, values, q_len, c_len in zip(full_keys, full_values, query_lens, context_lens, strict=True):
        k = keys.double().repeat_interleave(group, dim=1)  # [C, H, D]
        v = values.double().repeat_interleave(group, dim=1)
        for j in range(q_len):
            pos = c_len - q_len + j
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            scores = torch.einsum("hd,khd->hk", query[start + j].double(), k[lo : pos + 1]) * scale
            out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v[lo : pos + 1]))
        start += q_len
    return torch.stack(out)


CASES = {
    "mixed-prefill-chunks-and-decodes": ([1, 7, 1, 13, 3, 1], [9, 7, 30, 20, 3, 1]),
    "decode-only": ([1, 1, 1, 1], [1, 17, 33, 5]),
    "one-decode": ([1], [23]),  # no mask at all unless a window cuts its context
    "prefill-only": ([5, 12], [5, 12]),
    "chunk-continuing-a-cached-prefix": ([6], [40]),
}


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_torch_path_matches_float64_reference(case, block_size, sliding_window):
    query_lens, context_lens = CASES[case]
    query, k, v, kv_cache, attn, full_k, full_v = build_batch(
        query_lens, context_lens, block_size, num_blocks=64 + sum(context_lens), seed=block_size
    )
    layer = PagedAttention(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, sliding_window=sliding_window)
    out = layer(query, k, v, kv_cache, attn)
    expected = reference_attention(query, full_k, full_v, query_lens, context_lens, layer.scale, sliding_window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_write_kv_cache_stores_each_token_at_its_slot_and_skips_padding():
    kv_cache = torch.zeros(2, 4, 2, NUM_KV_HEADS, HEAD_DIM)
    k = torch.randn(4, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(4, NUM_KV_HEADS, HEAD_DIM)
    write_kv_cache(k, v, kv_cache, torch.tensor([7, 0, -1, 3]))
    assert torch.equal(kv_cache[0, 3, 1], k[0]) and torch.equal(kv_cache[0, 0, 0], k[1])
    assert torch.equal(kv_cache[1, 1, 1], v[3])
    assert int((kv_cache.abs().sum((-1, -2)) > 0).sum()) == 6  # 3 slots x (K, V); the padding token wrote nothing


def test_bfloat16_inputs_stay_close_to_float32():
    query_lens, context_lens = [1, 9], [12, 9]
    query, k, v, kv_cache, attn, *_ = build_batch(query_lens, context_lens, 4, 64, seed=1)
    write_kv_cache(k, v, kv_cache, attn.slot_mapping)
    scale = HEAD_DIM**-0.5
    full = paged_attention_torch(query, kv_cache[0], kv_cache[1], attn, scale)
    half_cache = kv_cache.bfloat16()
    half = paged_attention_torch(query.bfloat16(), half_cache[0], half_cache[1], attn, scale)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=5e-2)


def test_bfloat16_decode_is_as_close_to_exact_as_sdpa():
    query_lens, context_lens = [1, 1, 1], [40, 7, 96]
    query, k, v, kv_cache, attn, full_k, full_v = build_batch(query_lens, context_lens, 16, 64, seed=5)
    write_kv_cache(k, v, kv_cache, attn.slot_mapping)
    scale = HEAD_DIM**-0.5
    exact = reference_attention(query, full_k, full_v, query_lens, context_lens, scale, None)
    half_query, half_cache = query.bfloat16(), kv_cache.bfloat16()
    ours = paged_attention_torch(half_query, half_cache[0], half_cache[1], attn, scale)
    keys = [half_cache[0].view(-1, NUM_KV_HEADS, HEAD_DIM)[s] for s in _context_slots(attn)]
    values = [half_cache[1].view(-1, NUM_KV_HEADS, HEAD_DIM)[s] for s in _context_slots(attn)]
    sdpa = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q.view(1, NUM_HEADS, 1, HEAD_DIM), kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], scale=scale,
                enable_gqa=True,
            ).view(1, NUM_HEADS, HEAD_DIM)
            for q, kk, vv in zip(half_query, keys, values, strict=True)
        ]
    )  # fmt: skip
    assert (ours.double() - exact).abs().max() <= (sdpa.double() - exact).abs().max() * 1.01


def _context_slots(attn: AttentionMetadata) -> list[torch.Tensor]:
    """Each sequence's cache slots, position by position."""
    slots = []
    for table, length in zip(attn.block_tables.tolist(), attn.context_lens_cpu, strict=True):
        positions = torch.arange(length)
        slots.append(torch.tensor(table)[positions // attn.block_size] * attn.block_size + positions % attn.block_size)
    return slots


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_soft_capped_torch_path_matches_the_kernels_float64_reference(case, sliding_window):
    from weir_server.kernels.prefill_attention import paged_prefill_attention_ref

    query_lens, context_lens = CASES[case]
    query, k, v, kv_cache, attn, *_ = build_batch(query_lens, context_lens, 4, 64 + sum(context_lens), seed=3)
    query = query * 4  # scores well past the cap, so capping changes the answer
    layer = PagedAttention(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, sliding_window=sliding_window, logit_softcap=2.0)
    out = layer(query, k, v, kv_cache, attn)
    meta = (attn.block_tables, attn.context_lens, attn.query_start_loc, attn.max_query_len, layer.scale)
    expected = paged_prefill_attention_ref(query, kv_cache, *meta, sliding_window, logit_softcap=2.0)
    uncapped = paged_prefill_attention_ref(query, kv_cache, *meta, sliding_window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert (expected - uncapped).abs().max() > 1e-2
