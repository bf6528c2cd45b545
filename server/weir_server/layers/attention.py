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
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.rotary import StepRope

logger = logging.getLogger(__name__)

# CPU: steps with at most this many query tokens per sequence take the C++ op, whose per-token loops beat SDPA's
# kernel for a few queries (a decode, a speculative verify of K + 1); longer prefill chunks go to SDPA.
CPU_OP_MAX_QUERY_LEN = 8


class PagedAttention(nn.Module):
    """Attention of one layer over the paged KV cache; holds no weights, only the head layout."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.sliding_window = sliding_window
        # Gemma 2: scores become softcap * tanh(scores / softcap) before the softmax.
        self.logit_softcap = logit_softcap

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        rope: StepRope | None = None,
    ) -> torch.Tensor:
        """query [T, H, D], key/value [T, Hkv, D], kv_cache [2, blocks, block_size, Hkv, D] -> [T, H, D].

        With `rope`, q and k are rotated first; on CUDA rotation and the cache write are one kernel, and on CPU a
        step of at most CPU_OP_MAX_QUERY_LEN tokens per sequence (decode, speculative verify) does rotation, cache
        write and attention in one C++ op.
        """
        if rope is not None and attn.max_query_len <= CPU_OP_MAX_QUERY_LEN and cpu_op_fits(query, kv_cache, attn, rope):
            cos, sin = rope.flat_cos_sin()
            return cpu_ops().decode_attention(  # type: ignore[union-attr,no-any-return]
                query, key, value, cos, sin, kv_cache[0], kv_cache[1], attn.block_tables, attn.context_lens,
                attn.query_start_loc, attn.slot_mapping, self.scale, self.sliding_window or 0,
                self.logit_softcap or 0.0,
            )  # fmt: skip
        if rope is not None and rope.fused:
            rope.rotate_and_cache(query, key, value, kv_cache, attn.slot_mapping)
        else:
            if rope is not None:
                query, key = rope.rotate(query, key)
            write_kv_cache(key, value, kv_cache, attn.slot_mapping)
        return paged_attention(
            query, kv_cache[0], kv_cache[1], attn, self.scale, self.sliding_window, self.logit_softcap
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"sliding_window={self.sliding_window}, logit_softcap={self.logit_softcap}"
        )


def cpu_op_fits(query: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, rope: StepRope) -> bool:
    """Whether this step's attention may take the CPU C++ op: CPU tensors of one dtype, torch-path rotary, the
    metadata's usual index types."""
    return (
        query.device.type == "cpu"
        and rope.cos is not None
        and rope.cos.dtype == query.dtype
        and kv_cache.dtype == query.dtype
        and kv_cache.is_contiguous()
        and attn.block_tables.dtype == torch.int32
        and attn.context_lens.dtype == torch.int32
        and attn.query_start_loc.dtype == torch.int32
        and attn.slot_mapping.dtype == torch.int64
        and cpu_ops() is not None
    )


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store K/V [T, Hkv, D] at each token's slot of kv_cache [2, blocks, block_size, Hkv, D]; skip slots < 0."""
    if key.is_cuda and (kernels := _triton_kernels()) is not None:
        kernels.reshape_and_cache(key, value, kv_cache, slot_mapping)
        return
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:  # padding tokens of a CUDA-graph batch
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    for plane, src in ((kv_cache[0], key), (kv_cache[1], value)):
        plane.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, src.to(plane.dtype))


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached context; picks the backend for the device."""
    if query.is_cuda and (kernels := _triton_kernels()) is not None:
        return kernels.paged_attention(query, key_cache, value_cache, attn, scale, sliding_window, logit_softcap)
    return paged_attention_torch(query, key_cache, value_cache, attn, scale, sliding_window, logit_softcap)


@functools.cache
def _triton_kernels() -> SimpleNamespace | None:
    """The Triton kernels for CUDA tensors, or None (torch path, logged once) where Triton is missing."""
    try:
        from weir_server.kernels import HAS_TRITON
        from weir_server.kernels.cache_ops import reshape_and_cache
        from weir_server.kernels.paged_attention import paged_attention as triton_paged_attention
    except ImportError as error:
        logger.warning("Triton kernels unavailable (%s); CUDA attention uses the torch path", error)
        return None
    if not HAS_TRITON:
        logger.warning("Triton is not installed; CUDA attention uses the torch path")
        return None
    return SimpleNamespace(paged_attention=triton_paged_attention, reshape_and_cache=reshape_and_cache)


def paged_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Batched torch path: decode rows in one SDPA call, prefill chunks padded into another."""
    if attn.is_decode_only:
        return _decode_attention(query, key_cache, value_cache, attn, scale, sliding_window, logit_softcap)
    query_lens = attn.query_lens_cpu
    decode_seqs = [i for i, n in enumerate(query_lens) if n == 1]
    prefill_seqs = [i for i, n in enumerate(query_lens) if n > 1]
    if not decode_seqs:
        return _prefill_attention(query, key_cache, value_cache, attn, scale, sliding_window, logit_softcap)
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
        selected = _select_seqs(attn, seqs)
        out[tokens] = run(query[tokens], key_cache, value_cache, selected, scale, sliding_window, logit_softcap)
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


def _gather_context(cache: torch.Tensor, attn: AttentionMetadata, length: int | None = None) -> torch.Tensor:
    """[B, length, Hkv, D] (length: max_context_len unless given): each sequence's first cached tokens, read
    through its block table."""
    length = attn.max_context_len if length is None else length
    num_blocks = -(-length // attn.block_size)
    blocks_index = attn.derived.get(("context_blocks", num_blocks))
    if not isinstance(blocks_index, torch.Tensor):  # built once per step: every layer reads the same blocks
        blocks_index = attn.block_tables[:, :num_blocks].reshape(-1).long()
        attn.derived[("context_blocks", num_blocks)] = blocks_index
    # index_select on the flattened table is several times faster on CPU than advanced indexing.
    blocks = cache.index_select(0, blocks_index)  # [B * nb, block_size, Hkv, D]
    return blocks.view(attn.num_seqs, -1, *cache.shape[-2:])[:, :length]


def _sdpa(
    query: torch.Tensor,  # [B, Q, H, D]
    key: torch.Tensor,  # [B, L, Hkv, D]
    value: torch.Tensor,
    mask: torch.Tensor,  # [B, Q, L] bool, True = attend
    scale: float,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """SDPA with grouped-query heads; returns [B, Q, H, D]."""
    if logit_softcap is not None:
        return _softcapped_attention(query, key, value, mask, scale, logit_softcap)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2).to(query.dtype),
        value.transpose(1, 2).to(query.dtype),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=query.shape[2] != key.shape[2],
    )
    return out.transpose(1, 2)


def _softcapped_attention(
    query: torch.Tensor,  # [B, Q, H, D]
    key: torch.Tensor,  # [B, L, Hkv, D]
    value: torch.Tensor,
    mask: torch.Tensor,  # [B, Q, L] bool
    scale: float,
    logit_softcap: float,
) -> torch.Tensor:
    """Eager attention with tanh soft-capped scores (SDPA has no hook between the product and the softmax)."""
    group = query.shape[2] // key.shape[2]
    q = query.transpose(1, 2)  # [B, H, Q, D]
    k = key.transpose(1, 2).to(query.dtype).repeat_interleave(group, dim=1)  # [B, H, L, D]
    v = value.transpose(1, 2).to(query.dtype).repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / logit_softcap) * logit_softcap
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


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
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence, at position context_len - 1, as two batched matmuls per KV head group.

    Not SDPA: the CPU's flash kernel runs a single query 2x (one sequence, 96 tokens) to 4-5x (one of 384
    tokens; 32 of 96) slower than these matmuls, and it was most of a 32-stream decode step.
    """
    length = _decode_length(attn)
    keys = _gather_context(key_cache, attn, length)  # [B, L, Hkv, D]
    values = _gather_context(value_cache, attn, length)
    batch, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    # fp32 throughout, as SDPA accumulates: bf16 scores or probabilities would be 2-5x further from exact.
    grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    scores = torch.matmul(grouped, keys.permute(0, 2, 3, 1).float())  # [B, Hkv, group, L]
    scores.mul_(scale)
    if logit_softcap is not None:
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
    mask = _decode_mask(attn, sliding_window, query.device)
    if mask is not None:
        scores.masked_fill_(~mask.view(batch, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3).float())  # [B, Hkv, group, D]
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


def _decode_length(attn: AttentionMetadata) -> int:
    """The longest context of the batch: max_context_len is only a bound for a CUDA-graph batch, and keys past
    every context, though masked, would change the order of the sums (a padded batch must give the same bits)."""
    length = attn.derived.get("decode_length")
    if not isinstance(length, int):
        length = max(int(attn.context_lens.max()), 1)
        attn.derived["decode_length"] = length
    return length


def _decode_mask(attn: AttentionMetadata, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """[B, L] keys each decode query may see, built once per step and window; None where it sees all of them
    (one sequence outside any window), so no pass over the scores is spent on it."""
    key = ("decode_mask", sliding_window)
    if key in attn.derived:
        cached = attn.derived[key]
        return cached if isinstance(cached, torch.Tensor) else None
    length = _decode_length(attn)
    mask: torch.Tensor | None = None
    if attn.num_seqs > 1 or (sliding_window is not None and length > sliding_window):
        key_positions = torch.arange(length, device=device)
        query_positions = (attn.context_lens.to(device).long() - 1).unsqueeze(1)  # [B, 1]
        mask = _key_mask(key_positions, query_positions, sliding_window).squeeze(1)
    attn.derived[key] = mask
    return mask


def _prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logit_softcap: float | None = None,
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
    out = _sdpa(padded, keys, values, mask, scale, logit_softcap)
    return out.reshape(batch * max_q, *query.shape[1:])[padded_index]
