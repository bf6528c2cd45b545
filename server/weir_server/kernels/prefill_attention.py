"""Chunked-prefill attention over the paged KV cache: flash-attention style online softmax, causal, GQA.

Query token j of sequence i sits at position context_lens[i] - query_len_i + j and sees key n when
n <= position and, with a sliding window w, position - n < w (the same rule as layers/attention.py). With a
logit soft-cap c (Gemma 2) a score s becomes c * tanh(s / c) before the softmax.
"""

import functools

import torch

from weir_server.kernels import HAS_TRITON, next_power_of_2, require_triton, tl, triton

NO_WINDOW = 1 << 30  # stands in for "no sliding window" so the kernels need no branch on it
LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are scaled by log2(e)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact products; Triton would otherwise use tf32 on the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def softcap_scales(scale: float, logit_softcap: float | None) -> tuple[float, float]:
    """The kernels' (qk_scale, cap): scores are dot * qk_scale, then with a soft-cap cap * tanh(that), in log2 units.

    Without a cap qk_scale carries log2(e); with one the tanh sees scale / softcap and cap carries softcap * log2(e).
    """
    if logit_softcap is None:
        return scale * LOG2E, 0.0
    return scale / logit_softcap, logit_softcap * LOG2E


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[..., length, Hkv, D]: the first `length` tokens read through block table(s) of [..., max_blocks]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache[block_table[..., :num_blocks].long()]  # [..., nb, block_size, Hkv, D]
    return blocks.flatten(-4, -3)[..., :length, :, :]


def visible_keys(key_pos: torch.Tensor, query_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Bool mask broadcast from key positions [..., L] and query positions [..., 1]: causal + window."""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= query_pos - key_pos < sliding_window
    return mask


def grouped_attention_ref(
    q: torch.Tensor,  # [..., Hkv, G, D] float64
    keys: torch.Tensor,  # [..., L, Hkv, D] float64
    values: torch.Tensor,
    mask: torch.Tensor,  # broadcastable to [..., Hkv, G, L]
    scale: float,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention with grouped heads in float64; a query with no visible key gets zeros."""
    scores = torch.einsum("...kgd,...lkd->...kgl", q, keys) * scale
    if logit_softcap is not None:
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with every key masked give NaN
    return torch.einsum("...kgl,...lkd->...kgd", probs, values)


def paged_prefill_attention_ref(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Reference in float64, one sequence at a time: q [T, H, D] -> [T, H, D] float64."""
    num_kv_heads, head_dim = kv_cache_layer.shape[-2:]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    starts = query_start_loc.tolist()
    for i, ctx in enumerate(context_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        keys = gather_context(kv_cache_layer[0], block_tables[i], ctx).double()
        values = gather_context(kv_cache_layer[1], block_tables[i], ctx).double()
        query_pos = torch.arange(ctx - (end - start), ctx, device=q.device).view(-1, 1, 1, 1)
        mask = visible_keys(torch.arange(ctx, device=q.device), query_pos, sliding_window)
        seq_q = q[start:end].double().view(end - start, num_kv_heads, group, head_dim)
        out[start:end] = grouped_attention_ref(seq_q, keys, values, mask, scale, logit_softcap).flatten(1, 2)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Triton kernel: q [T, H, D] -> [T, H, D] in q's dtype; also right for decode rows (query_len 1)."""
    return prefill_attention(
        q,
        kv_cache_layer[0],
        kv_cache_layer[1],
        block_tables,
        context_lens,
        query_start_loc,
        max_query_len,
        scale,
        sliding_window,
        logit_softcap=logit_softcap,
    )


def prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """The kernel launch on separate K and V caches [num_blocks, block_size, Hkv, D]; knobs for benchmarks."""
    require_triton()
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    out = torch.empty_like(q)
    if num_tokens == 0 or max_query_len == 0:
        return out
    head_dim_pad = next_power_of_2(head_dim)
    if block_m is None:
        block_m, block_n, num_warps, num_stages = _default_config(q, max_query_len * group_pad, head_dim_pad)
    block_m = max(block_m, group_pad)
    block_q = block_m // group_pad
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    grid = (triton.cdiv(max_query_len, block_q), context_lens.shape[0], num_kv_heads)
    qk_scale, cap = softcap_scales(scale, logit_softcap)
    _prefill_kernel[grid](
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        query_start_loc,
        out,
        qk_scale,
        cap,
        sliding_window if sliding_window is not None else NO_WINDOW,
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
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        SOFTCAP=logit_softcap is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# (block_m, block_n, num_warps, num_stages), fastest first as measured on an H100 (scripts/check_kernels_gpu.py);
# the first whose K/V pipeline and query tile fit in the device's shared memory is used.
_CONFIGS = ((128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1))


def _default_config(q: torch.Tensor, rows: int, head_dim_pad: int) -> tuple[int, int, int, int]:
    if rows <= 64:  # small chunks and decode rows waste less of a 64-row tile
        return 64, 64, 4, 2
    smem = _shared_memory(q.device)
    for block_m, block_n, warps, stages in _CONFIGS:
        # 0.8: Triton adds scratch of its own (layout conversions) beyond the tiles counted here.
        if (2 * stages * block_n + block_m) * head_dim_pad * q.element_size() <= 0.8 * smem:
            return block_m, block_n, warps, stages
    return _CONFIGS[-1]


@functools.cache
def _shared_memory_cuda(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 48 * 1024)


def _shared_memory(device: torch.device) -> int:
    if device.type != "cuda":  # the Triton interpreter on CPU: size as for an H100
        return 227 * 1024
    return _shared_memory_cuda(device.index if device.index is not None else torch.cuda.current_device())


if HAS_TRITON:

    @triton.jit
    def tanh(x):
        # exp-based so that it needs no libdevice; saturates cleanly to +-1 in fp32.
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _attend_keys(
        q,
        acc,
        m_i,
        l_i,
        key_lo,
        key_hi,
        pos,
        window,
        qk_scale,
        cap,
        k_cache_ptr,
        v_cache_ptr,
        block_table_ptr,
        kv_head,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        SOFTCAP: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        # Online softmax over keys [key_lo, key_hi); unmasked calls get whole chunks every row may see.
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        for start_n in range(key_lo, key_hi, BLOCK_N):
            keys_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys_n < key_hi
            block = tl.load(block_table_ptr + keys_n // BLOCK_SIZE, mask=key_ok, other=0)
            slot = block.to(tl.int64)[:, None]
            in_block = (keys_n % BLOCK_SIZE)[:, None]
            load_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(
                k_cache_ptr + slot * stride_kb + in_block * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=load_mask,
                other=0.0,
            ).to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if SOFTCAP:
                qk = cap * tanh(qk)
            if MASKED:
                visible = (keys_n[None, :] <= pos[:, None]) & (pos[:, None] - keys_n[None, :] < window)
                qk = tl.where(visible & key_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_cache_ptr + slot * stride_vb + in_block * stride_vt + kv_head * stride_vh + dims[None, :],
                mask=load_mask,
                other=0.0,
            ).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _prefill_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        query_start_loc_ptr,
        out_ptr,
        qk_scale,
        cap,
        window,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_bt,
        stride_ot,
        stride_oh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        # One program: BLOCK_Q query tokens x all GROUP query heads of one KV head, as BLOCK_Q*GROUP_PAD rows.
        # Later query blocks see more keys, so they are launched first.
        q_block = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        if q_block * BLOCK_Q >= q_len:
            return
        ctx = tl.load(context_lens_ptr + seq)
        first_pos = ctx - q_len

        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        rows = tl.arange(0, BLOCK_M)
        q_idx = q_block * BLOCK_Q + rows // GROUP_PAD
        head = kv_head * GROUP + rows % GROUP_PAD
        row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
        pos = first_pos + q_idx
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q_offsets = (q_start + q_idx).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

        # Keys [lo, hi) matter to some row; [full_lo, full_hi), in whole chunks, to every row: no mask there.
        min_pos = first_pos + q_block * BLOCK_Q
        max_pos = first_pos + tl.minimum(q_len, (q_block + 1) * BLOCK_Q) - 1
        lo = tl.maximum(min_pos - window + 1, 0)
        hi = max_pos + 1
        full_lo = tl.maximum(max_pos - window + 1, lo)
        full_hi = full_lo + tl.maximum(min_pos + 1 - full_lo, 0) // BLOCK_N * BLOCK_N
        # A finite start: exp2(-inf - start) is 0 where exp2(-inf - -inf) would be NaN.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        table = block_tables_ptr + seq * stride_bt
        acc, m_i, l_i = _attend_keys(
            q,
            acc,
            m_i,
            l_i,
            lo,
            full_lo,
            pos,
            window,
            qk_scale,
            cap,
            k_cache_ptr,
            v_cache_ptr,
            table,
            kv_head,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            HEAD_DIM,
            HEAD_DIM_PAD,
            BLOCK_SIZE,
            BLOCK_N,
            DOT_PRECISION,
            SOFTCAP,
            True,
        )
        acc, m_i, l_i = _attend_keys(
            q,
            acc,
            m_i,
            l_i,
            full_lo,
            full_hi,
            pos,
            window,
            qk_scale,
            cap,
            k_cache_ptr,
            v_cache_ptr,
            table,
            kv_head,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            HEAD_DIM,
            HEAD_DIM_PAD,
            BLOCK_SIZE,
            BLOCK_N,
            DOT_PRECISION,
            SOFTCAP,
            False,
        )
        acc, m_i, l_i = _attend_keys(
            q,
            acc,
            m_i,
            l_i,
            full_hi,
            hi,
            pos,
            window,
            qk_scale,
            cap,
            k_cache_ptr,
            v_cache_ptr,
            table,
            kv_head,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            HEAD_DIM,
            HEAD_DIM_PAD,
            BLOCK_SIZE,
            BLOCK_N,
            DOT_PRECISION,
            SOFTCAP,
            True,
        )

        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        out_offsets = (q_start + q_idx).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
