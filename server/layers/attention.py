"""Paged attention: write this step's K/V into the block cache, then attend over each sequence's blocks.

`paged_attention()` is the single dispatch point: CUDA tensors go to the Triton kernel in
`weir_server.kernels` when it is available, everything else to the batched torch path below, which is also
the reference the kernel is tested against.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from weir_server.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

# (query [T, H, D], key_cache, value_cache [num_blocks, block_size, Hkv, D], attn, scale, sliding_window)
AttentionBackend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float, int | None], torch.Tensor
]


class PagedAttention(nn.Module):
    """Attention of one layer over the paged KV cache; holds no weights, only the head layout."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.sliding_window = sliding_window

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """query [T, H, D], key/value [T, Hkv, D], kv_cache [2, blocks, block_size, Hkv, D] -> [T, H, D]."""
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        write_kv_cache(key, value, key_cache, value_cache, attn.slot_mapping)
        return paged_attention(query, key_cache, value_cache, attn, self.scale, self.sliding_window)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"sliding_window={self.sliding_window}"
        )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each token's K/V at its slot (block * block_size + offset) of the flattened cache."""
    num_kv_heads, head_dim = key_cache.shape[-2:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached context; picks the backend for the device."""
    backend = _cuda_backend() if query.is_cuda else None
    if backend is None:
        backend = paged_attention_torch
    return backend(query, key_cache, value_cache, attn, scale, sliding_window)


@functools.cache
def _cuda_backend() -> AttentionBackend | None:
    """The Triton kernel from `weir_server.kernels.paged_attention`, or None (torch path) if absent."""
    try:
        from weir_server.kernels.paged_attention import paged_attention as triton_paged_attention
    except ImportError as error:
        logger.warning("Triton paged attention unavailable (%s); using the torch path on CUDA", error)
        return None
    return triton_paged_attention


def paged_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Batched torch path: decode rows in one SDPA call, prefill chunks padded into another."""
    if attn.is_decode_only:
        return _decode_attention(query, key_cache, value_cache, attn, scale, sliding_window)
    query_lens = attn.query_lens_cpu
    decode_seqs = [i for i, n in enumerate(query_lens) if n == 1]
    prefill_seqs = [i for i, n in enumerate(query_lens) if n > 1]
    if not decode_seqs:
        return _prefill_attention(query, key_cache, value_cache, attn, scale, sliding_window)
    # Mixed batch: padding every decode row to the longest prefill chunk would waste
    # (num_decodes x chunk x context) scores, so each kind runs as its own batch.
    starts = list(itertools.accumulate(query_lens, initial=0))
    decode_tokens = torch.tensor([starts[i] for i in decode_seqs])
    prefill_tokens = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in prefill_seqs])
    out = torch.empty_like(query)
    for seqs, tokens, run in (
        (decode_seqs, decode_tokens, _decode_attention),
        (prefill_seqs, prefill_tokens, _prefill_attention),
    ):
        tokens = tokens.to(query.device)
        out[tokens] = run(query[tokens], key_cache, value_cache, _select_seqs(attn, seqs), scale, sliding_window)
    return out


def _select_seqs(attn: AttentionMetadata, seqs: list[int]) -> AttentionMetadata:
    """The metadata of a subset of the batch's sequences, in the given order (slot_mapping is not used)."""
    index = torch.tensor(seqs, device=attn.block_tables.device)
    query_lens = [attn.query_lens_cpu[i] for i in seqs]
    context_lens = [attn.context_lens_cpu[i] for i in seqs]
    starts = list(itertools.accumulate(query_lens, initial=0))
    return AttentionMetadata(
        slot_mapping=attn.slot_mapping,
        block_tables=attn.block_tables[index],
        context_lens=attn.context_lens[index],
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=attn.query_start_loc.device),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        block_size=attn.block_size,
        query_lens_cpu=query_lens,
        context_lens_cpu=context_lens,
    )


def _gather_context(cache: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
    """[B, max_context_len, Hkv, D]: each sequence's cached tokens read through its block table."""
    num_blocks = -(-attn.max_context_len // attn.block_size)
    blocks = cache[attn.block_tables[:, :num_blocks].long()]  # [B, nb, block_size, Hkv, D]
    batch = blocks.shape[0]
    return blocks.reshape(batch, -1, *cache.shape[-2:])[:, : attn.max_context_len]


def _sdpa(
    query: torch.Tensor,  # [B, Q, H, D]
    key: torch.Tensor,  # [B, L, Hkv, D]
    value: torch.Tensor,
    mask: torch.Tensor,  # [B, Q, L] bool, True = attend
    scale: float,
) -> torch.Tensor:
    """SDPA with grouped-query heads; returns [B, Q, H, D]."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2).to(query.dtype),
        value.transpose(1, 2).to(query.dtype),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=query.shape[2] != key.shape[2],
    )
    return out.transpose(1, 2)


def _key_mask(
    key_positions: torch.Tensor,  # [L]
    query_positions: torch.Tensor,  # [B, Q]
    sliding_window: int | None,
) -> torch.Tensor:
    """[B, Q, L]: causal (key <= query position), and within the sliding window when there is one."""
    kp = key_positions.view(1, 1, -1)
    qp = query_positions.unsqueeze(-1)
    mask = kp <= qp
    if sliding_window is not None:
        mask &= kp > qp - sliding_window
    return mask


def _decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query token per sequence, at position context_len - 1."""
    keys = _gather_context(key_cache, attn)
    values = _gather_context(value_cache, attn)
    key_positions = torch.arange(attn.max_context_len, device=query.device)
    query_positions = (attn.context_lens.to(query.device).long() - 1).unsqueeze(1)  # [B, 1]
    mask = _key_mask(key_positions, query_positions, sliding_window)
    return _sdpa(query.unsqueeze(1), keys, values, mask, scale).squeeze(1)


def _prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Queries padded per sequence to max_query_len; query j of a sequence sits at context_len - query_len + j."""
    device = query.device
    batch, max_q = attn.num_seqs, attn.max_query_len
    query_lens = torch.tensor(attn.query_lens_cpu, device=device)
    context_lens = torch.tensor(attn.context_lens_cpu, device=device)

    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=device), query_lens)
    starts = torch.cumsum(query_lens, 0) - query_lens
    offset_in_seq = torch.arange(query.shape[0], device=device) - starts[seq_of_token]
    padded_index = seq_of_token * max_q + offset_in_seq

    padded = query.new_zeros(batch * max_q, *query.shape[1:])
    padded[padded_index] = query
    padded = padded.view(batch, max_q, *query.shape[1:])

    offsets = torch.arange(max_q, device=device).unsqueeze(0)
    query_positions = (context_lens - query_lens).unsqueeze(1) + offsets  # [B, max_q]
    # Padding rows look at key 0 only, so no row is fully masked (SDPA would return NaN there).
    query_positions = torch.where(offsets < query_lens.unsqueeze(1), query_positions, 0)

    keys = _gather_context(key_cache, attn)
    values = _gather_context(value_cache, attn)
    key_positions = torch.arange(attn.max_context_len, device=device)
    mask = _key_mask(key_positions, query_positions, sliding_window)
    out = _sdpa(padded, keys, values, mask, scale)
    return out.reshape(batch * max_q, *query.shape[1:])[padded_index]
