"""Paged decode attention: one query token per sequence, split-K over the context, then a reduce.

Each program reads one KV head's keys once for all the query heads that share it (GQA). Long contexts are cut
into partitions so that small batches still fill the GPU; a second kernel merges the partial softmaxes.
"""

import functools

import torch

from weir_server.kernels import HAS_TRITON, next_power_of_2, require_triton, tl, triton
from weir_server.kernels.prefill_attention import (
    NO_WINDOW,
    dot_precision,
    gather_context,
    grouped_attention_ref,
    softcap_scales,
    visible_keys,
)

MIN_PARTITION = 256  # shorter partitions cost more in the reduce than they gain in parallelism
MAX_SPLITS = 64  # the reduce kernel holds every partition of a row in registers


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Reference in float64, the whole batch at once: q [B, H, D] at position context_len - 1 -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache_layer.shape[-2]
    length = int(context_lens.max()) if batch else 0
    keys = gather_context(kv_cache_layer[0], block_tables, length).double()  # [B, L, Hkv, D]
    values = gather_context(kv_cache_layer[1], block_tables, length).double()
    key_pos = torch.arange(length, device=q.device)
    query_pos = (context_lens.long() - 1).view(batch, 1, 1, 1)
    mask = visible_keys(key_pos, query_pos, sliding_window)  # [B, 1, 1, L]
    grouped = q.double().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    return grouped_attention_ref(grouped, keys, values, mask, scale, logit_softcap).reshape(batch, num_heads, head_dim)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Triton kernel: q [B, H, D] -> [B, H, D] in q's dtype.

    `max_context_len` only sizes the split; any value is correct, and None (the block table's capacity)
    never syncs with the device, which CUDA graph capture needs.
    """
    return decode_attention(
        q,
        kv_cache_layer[0],
        kv_cache_layer[1],
        block_tables,
        context_lens,
        scale,
        sliding_window,
        max_context_len,
        logit_softcap=logit_softcap,
    )


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the Triton interpreter on CPU: size as for an H100
        return 132
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_partition(batch: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Tokens per split-K partition: enough partitions for ~2 programs per SM; 0 = one pass, no reduce."""
    num_sms = _num_sms(device)
    programs = max(batch * num_kv_heads, 1)
    splits = min(-(-2 * num_sms // programs), -(-max_context_len // MIN_PARTITION), MAX_SPLITS)
    if splits <= 1:
        return 0
    partition = -(-max_context_len // splits)
    return next_power_of_2(max(partition, MIN_PARTITION))


def decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
    partition_size: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """The launch on separate K and V caches [num_blocks, block_size, Hkv, D]; tuning knobs for benchmarks."""
    require_triton()
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = choose_partition(batch, num_kv_heads, max_context_len, q.device)
    # The last partition runs to the end of the context, so a stale max_context_len is slow, never wrong.
    num_splits = max(-(-max_context_len // partition_size), 1) if partition_size else 1
    if num_splits == 1:
        partition_size = 0
    partial = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((2, batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    head_dim_pad = next_power_of_2(head_dim)
    qk_scale, cap = softcap_scales(scale, logit_softcap)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        out,
        partial,
        stats,
        qk_scale,
        cap,
        sliding_window if sliding_window is not None else NO_WINDOW,
        partition_size,
        num_splits,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(next_power_of_2(group), 16),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        SOFTCAP=logit_softcap is not None,
        num_warps=num_warps,
        num_stages=2,
    )
    if num_splits > 1:
        _reduce_kernel[(batch, num_heads)](
            partial,
            stats,
            context_lens,
            out,
            partition_size,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


if HAS_TRITON:
    from weir_server.kernels.prefill_attention import tanh

    @triton.jit
    def _decode_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        out_ptr,
        partial_ptr,
        stats_ptr,
        qk_scale,
        cap,
        window,
        partition_size,
        num_splits,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_bt,
        stride_ob,
        stride_oh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        # One program: one sequence, one KV head with its GROUP query heads, one partition of the context.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        num_heads = tl.num_programs(1) * GROUP
        ctx = tl.load(context_lens_ptr + seq)
        start = split * partition_size
        if (split > 0) & (start >= ctx):
            return  # the reduce skips partitions past the context
        end = ctx
        if split < num_splits - 1:
            end = tl.minimum(start + partition_size, ctx)
        lo = tl.maximum(start, ctx - window)

        rows = tl.arange(0, GROUP_PAD)
        head = kv_head * GROUP + rows
        row_ok = rows < GROUP
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q = tl.load(
            q_ptr + seq.to(tl.int64) * stride_qb + head[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        # A finite start: exp2(-inf - start) is 0 where exp2(-inf - -inf) would be NaN.
        m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
        for start_n in range(lo, end, BLOCK_N):
            keys_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys_n < end
            block = tl.load(block_tables_ptr + seq * stride_bt + keys_n // BLOCK_SIZE, mask=key_ok, other=0)
            slot = block.to(tl.int64)[:, None]
            in_block = (keys_n % BLOCK_SIZE)[:, None]
            load_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(
                k_cache_ptr + slot * stride_kb + in_block * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=load_mask,
                other=0.0,
            ).to(q.dtype)
            v = tl.load(
                v_cache_ptr + slot * stride_vb + in_block * stride_vt + kv_head * stride_vh + dims[None, :],
                mask=load_mask,
                other=0.0,
            ).to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if SOFTCAP:
                qk = cap * tanh(qk)
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        out_mask = row_ok[:, None] & dim_ok[None, :]
        if num_splits == 1:
            out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            out_offsets = seq.to(tl.int64) * stride_ob + head[:, None] * stride_oh + dims[None, :]
            tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # Unnormalised partials [B, H, S, D] and (max, sum) in stats [2, B, H, S]; base-2 exponents.
            row = (seq * num_heads + head).to(tl.int64) * num_splits + split
            tl.store(partial_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
            num_rows = tl.num_programs(0) * num_heads * num_splits
            tl.store(stats_ptr + row, m_i, mask=row_ok)
            tl.store(stats_ptr + num_rows + row, l_i, mask=row_ok)

    @triton.jit
    def _reduce_kernel(
        partial_ptr,
        stats_ptr,
        context_lens_ptr,
        out_ptr,
        partition_size,
        num_splits,
        stride_ob,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        # Merge one (sequence, head)'s partition softmaxes: rescale each by exp2(m_s - max m).
        seq = tl.program_id(0)
        head = tl.program_id(1)
        num_heads = tl.num_programs(1)
        ctx = tl.load(context_lens_ptr + seq)
        used = tl.minimum(tl.maximum(tl.cdiv(ctx, partition_size), 1), num_splits)
        splits = tl.arange(0, SPLITS_PAD)
        split_ok = splits < used
        row = (seq * num_heads + head).to(tl.int64) * num_splits + splits
        num_rows = tl.num_programs(0) * num_heads * num_splits
        m = tl.load(stats_ptr + row, mask=split_ok, other=float("-inf"))
        sums = tl.load(stats_ptr + num_rows + row, mask=split_ok, other=0.0)
        weight = tl.exp2(m - tl.max(m, 0))
        weight = tl.where(split_ok, weight, 0.0)
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        acc = tl.load(
            partial_ptr + row[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :], other=0.0
        )
        num = tl.sum(acc * weight[:, None], 0)
        den = tl.sum(sums * weight, 0)
        out = num / tl.where(den > 0.0, den, 1.0)
        out_offsets = seq.to(tl.int64) * stride_ob + head * stride_oh + dims
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=dim_ok)
