"""y = x W for a 4-bit grouped weight (AWQ / GPTQ), dequantized inside the kernel (Triton).

W [K, N] is held as `qweight` int32 [K / 8, N] (eight input rows per word, row 8r + i in bits 4i..4i+3), and per
group of input rows a scale and a zero point, `scales` and `zeros` [G, N] in the activations' dtype:
W[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n], g = k // group_size, or g = g_idx[k] where GPTQ's act-order
left the groups interleaved (tensor-parallel shards of such a weight).

Each program dequantizes a [BLOCK_K, BLOCK_N] tile and feeds tl.dot with float32 accumulation; small-M tiles
(decode) are narrow in N so that a step's few rows still spread over the SMs. No host syncs: CUDA graphs capture
it. The reference is `int4_matmul_reference`: `dequantize_int4` then a matmul.
"""

from __future__ import annotations

import torch

from weir_server.kernels import HAS_TRITON, require_triton, tl, triton

SMALL_M = 16


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K / 8, N] -> q uint8 [K, N] in 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF
    return q.reshape(-1, qweight.shape[1]).to(torch.uint8)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] in 0..15 (K a multiple of 8) -> qweight int32 [K / 8, N], the inverse of `unpack_rows`."""
    k, n = q.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (q.to(torch.int64).reshape(k // 8, 8, n) << shifts.view(1, 8, 1)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """W [K, N] in float32 from its packed form (see the module docstring)."""
    q = unpack_rows(qweight).float()
    groups = g_idx.long() if g_idx is not None else torch.arange(q.shape[0], device=q.device) // group_size
    return (q - zeros.float()[groups]) * scales.float()[groups]


def int4_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype."""
    return x @ dequantize_int4(qweight, scales, zeros, group_size, g_idx).to(x.dtype)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] (x's dtype), W dequantized tile by tile in the kernel."""
    require_triton()
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"int4 weight of {qweight.shape[0] * 8} input rows does not fit K={k}")
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m <= SMALL_M:
        block_m, block_n, block_k, warps = 16, 32 if n >= 8192 else 16, 128, 4
    else:
        block_m, block_n, block_k, warps = 64, 64, 64, 4
    # Without g_idx a tile's rows share one group when the tile lies inside it: one row of scales per tile.
    block_k = min(block_k, group_size) if g_idx is None else block_k
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        g_idx if g_idx is not None else qweight,  # an unused pointer when HAS_G_IDX is off
        out,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        out.stride(0),
        GROUP=group_size,
        HAS_G_IDX=g_idx is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out


if HAS_TRITON:

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr,
        qw_ptr,
        scales_ptr,
        zeros_ptr,
        g_idx_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_qk,
        stride_sg,
        stride_om,
        GROUP: tl.constexpr,
        HAS_G_IDX: tl.constexpr,
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
            x = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w_mask = k_ok[:, None] & col_ok[None, :]
            words = tl.load(qw_ptr + (ks // 8).to(tl.int64)[:, None] * stride_qk + cols[None, :], mask=w_mask, other=0)
            q = ((words >> ((ks % 8) * 4)[:, None]) & 0xF).to(tl.float32)
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + ks, mask=k_ok, other=0).to(tl.int64)
                offs = g[:, None] * stride_sg + cols[None, :]
                s = tl.load(scales_ptr + offs, mask=w_mask, other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + offs, mask=w_mask, other=0.0).to(tl.float32)
                w = (q - z) * s
            else:
                g0 = k0 // GROUP
                s = tl.load(scales_ptr + g0 * stride_sg + cols, mask=col_ok, other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + g0 * stride_sg + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = (q - z[None, :]) * s[None, :]
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        tl.store(
            out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )
