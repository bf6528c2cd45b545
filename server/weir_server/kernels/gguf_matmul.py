"""y = x W^T with W in GGUF blocks, dequantized inside the kernel (Triton): the weights cross memory packed.

One kernel serves every packed type (a constexpr picks the block format) and both shapes of step: prefill
tiles of 64 rows, and small-M tiles of 16 rows (narrow in N, long in K) for decode, where the step is bound by
reading the weights.
Each program dequantizes a [BLOCK_K, BLOCK_N] tile of W from its bytes (scales re-read per element hit the
cache) and feeds tl.dot in the activations' dtype with float32 accumulation. No host syncs, so CUDA graphs
capture it.

The reference is `gguf_matmul_reference`: dequantize (`kernels.gguf_dequant`) then matmul.
"""

from __future__ import annotations

import torch

from weir_server.kernels import HAS_TRITON, require_triton, tl, triton
from weir_server.kernels.gguf_dequant import GGMLType, dequantize

SMALL_M = 16  # up to this many rows a step uses the decode tiles


def gguf_matmul_reference(x: torch.Tensor, raw: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """x [M, K] @ dequantize(raw [N, row_bytes])^T -> [M, N] in x's dtype."""
    return x @ dequantize(raw, qtype).to(x.dtype).t()


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] (x's dtype) for W's raw GGUF rows [N, K / block_size * type_size] (uint8)."""
    m, k = x.shape
    n = raw.shape[0]
    if raw.shape[1] * qtype.block_size != k * qtype.type_size:
        raise ValueError(f"{qtype.name} weight of {raw.shape[1]} bytes per row does not fit K={k}")
    require_triton()
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m <= SMALL_M:  # few rows: narrow column tiles, so that even a 2048-row weight spreads over the SMs
        block_m, block_n, block_k, warps = 16, 32 if n >= 8192 else 16, 128, 4
    else:
        block_m, block_n, block_k, warps = 64, 64, 64, 4
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gguf_matmul_kernel[grid](
        x,
        raw,
        out,
        m,
        n,
        k,
        x.stride(0),
        raw.stride(0),
        out.stride(0),
        QTYPE=qtype.id,
        QK=qtype.block_size,
        TYPE_SIZE=qtype.type_size,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out


if HAS_TRITON:

    @triton.jit
    def _f16_at(ptr, mask):
        lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _byte_at(ptr, mask):
        return tl.load(ptr, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _k_scale_min(p, sub, mask):
        """Q4_K/Q5_K: the six-bit scale and min of sub-block `sub` (0..7) from the 12 bytes at p + 4."""
        lo = _byte_at(p + 4 + sub % 4, mask)  # byte j of the 12 (j = sub % 4)
        mid = _byte_at(p + 8 + sub % 4, mask)  # byte j + 4
        hi = _byte_at(p + 12 + sub % 4, mask)  # byte j + 8
        first = sub < 4
        sc = tl.where(first, lo & 63, (hi & 0xF) | ((lo >> 6) << 4))
        mn = tl.where(first, mid & 63, (hi >> 4) | ((mid >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _dequant_tile(p, j, mask, QTYPE: tl.constexpr):
        """Weights at element j of the blocks starting at p (tiles of pointers and indices)."""
        if QTYPE == 2:  # Q4_0
            q = (_byte_at(p + 2 + j % 16, mask) >> (4 * (j // 16))) & 0xF
            w = _f16_at(p, mask) * (q - 8).to(tl.float32)
        elif QTYPE == 3:  # Q4_1
            q = (_byte_at(p + 4 + j % 16, mask) >> (4 * (j // 16))) & 0xF
            w = _f16_at(p, mask) * q.to(tl.float32) + _f16_at(p + 2, mask)
        elif QTYPE == 8:  # Q8_0
            q = tl.load(p + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True)
            w = _f16_at(p, mask) * q.to(tl.float32)
        elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K
            sub = j // 32
            sc, mn = _k_scale_min(p, sub, mask)
            chunk, lane = j // 64, j % 32
            if QTYPE == 12:
                q = (_byte_at(p + 16 + 32 * chunk + lane, mask) >> (4 * (sub % 2))) & 0xF
            else:
                low = (_byte_at(p + 48 + 32 * chunk + lane, mask) >> (4 * (sub % 2))) & 0xF
                q = low | (((_byte_at(p + 16 + lane, mask) >> sub) & 1) << 4)
            w = (_f16_at(p, mask) * sc) * q.to(tl.float32) - _f16_at(p + 2, mask) * mn
        else:  # Q6_K
            half, r = j // 128, j % 128
            low = (_byte_at(p + half * 64 + r % 64, mask) >> (4 * (r // 64))) & 0xF
            high = (_byte_at(p + 128 + half * 32 + r % 32, mask) >> (2 * (r // 32))) & 3
            sc = tl.load(p + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = (_f16_at(p + 208, mask) * sc) * ((low | (high << 4)) - 32).to(tl.float32)
        return w

    @triton.jit
    def _gguf_matmul_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        QTYPE: tl.constexpr,
        QK: tl.constexpr,
        TYPE_SIZE: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            # The W tile [BLOCK_N, BLOCK_K], k fastest as in memory (a row's bytes are contiguous).
            w_mask = col_ok[:, None] & k_ok[None, :]
            block_start = w_ptr + cols[:, None].to(tl.int64) * stride_wn + (ks[None, :] // QK) * TYPE_SIZE
            w = tl.trans(_dequant_tile(block_start, ks[None, :] % QK, w_mask, QTYPE).to(a.dtype))
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        out = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
