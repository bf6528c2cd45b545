"""y = x W^T with W a GGUF weight in planes (`kernels.gguf_planes`), dequantized inside the kernel (Triton).

Up to `DEQUANTIZE_MIN_ROWS` rows, each program holds a [BLOCK_M, BLOCK_N] tile of y and walks K: one wide load of
the quants tile (4-bit ones unpacked by a join of low and high nibbles), the scale planes for its groups, the
weights formed in float32 as the reference does, then tl.dot in the activations' dtype with float32
accumulation. Decode steps are bound by reading the weights, so they take narrow column tiles and, where the
tiles alone would leave SMs idle, split K over several programs whose float32 partials are summed in a fixed
order (no atomics: the result does not depend on scheduling). No host syncs, so CUDA graphs capture it.

From `DEQUANTIZE_MIN_ROWS` rows (prefill) forming the weights once per tile of rows costs more than the product
itself. A weight of at most `DEQUANTIZE_MAX_WEIGHTS` weights is then dequantized whole by a second kernel into the
activations' dtype and multiplied by cuBLAS; larger ones take the same kernel's PREFILL_TILES. (H100, 1B shapes
at 256 rows: the down projection 0.043 ms dequantized whole against 0.11-0.14 in tiles; dequantizing the head or
gate/up in chunks of 2^24 weights cost 0.22-2.6 ms against 0.07-0.7 in tiles, for a reason not yet found.)

The reference is `gguf_matmul_reference`: `dequantize_planes` then a matmul.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from weir_server.kernels import HAS_TRITON, require_triton, tl, triton
from weir_server.kernels.gguf_dequant import Q4_0
from weir_server.kernels.gguf_planes import GGUFPlanes, dequantize_planes

SMALL_M = 16  # up to this many rows a step takes the decode tiles
DEQUANTIZE_MIN_ROWS = 64  # from this many rows: dequantize W, then cuBLAS (a W of at most DEQUANTIZE_MAX_WEIGHTS)
DEQUANTIZE_MAX_WEIGHTS = 1 << 24  # a scratch of 32 MiB in bf16
# Many rows, per the same sweep: [64, 64] tiles up to 127 rows (gate/up and head at 64 rows: 0.04 and 0.23 ms,
# bf16 0.036 and 0.195), [128, 64] from 128.
PREFILL_TILES = ((64, 64, 128, 1, 4, 3), (128, 64, 64, 1, 4, 4))


class TileConfig(NamedTuple):
    """One launch's tiling: rows and columns of y per program, K per iteration, K splits, warps and stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def gguf_matmul_reference(x: torch.Tensor, planes: GGUFPlanes) -> torch.Tensor:
    """x [M, K] @ dequantize_planes(planes)^T -> [M, N] in x's dtype."""
    return x @ dequantize_planes(planes).to(x.dtype).t()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_tiles(m: int, n: int, k: int, sms: int) -> TileConfig:
    """The tiling for an [m, k] x [k, n] product in the kernel, from a sweep at one row on an H100 (1B shapes):
    wide weights (N >= 8192) read fastest in [64, 128] tiles; narrow ones in [16, 256] (K <= 4096) or [32, 256]
    tiles with K split while each split keeps 8 iterations (the down projection: split 4, 0.030 ms against 0.042
    unsplit; the o projection: unsplit, 0.014 against 0.015 in 4). Many rows: PREFILL_TILES."""
    if m >= DEQUANTIZE_MIN_ROWS:
        return TileConfig(*PREFILL_TILES[m >= 128])
    block_m = 16 if m <= SMALL_M else 32 if m <= 32 else 64
    if n >= 8192:
        return TileConfig(block_m, 64, 128, 1, 4, 3)
    block_n, block_k = (16 if k <= 4096 else 32), 256
    tiles, iterations = -(-n // block_n), -(-k // block_k)
    split = 1
    while iterations // (split * 2) >= 8 and tiles * split * 2 <= 4 * sms:
        split *= 2
    return TileConfig(block_m, block_n, block_k, split, 4, 3)


def plane_args(planes: GGUFPlanes) -> dict[str, Any]:
    """The kernels' plane pointers, strides and format flags; planes the type lacks are passed as q, never read."""
    return dict(
        q_ptr=planes.q,
        d_ptr=planes.d,
        sub_ptr=planes.sub if planes.sub is not None else planes.q,
        dmin_ptr=planes.dmin if planes.dmin is not None else planes.q,
        mins_ptr=planes.mins if planes.mins is not None else planes.q,
        stride_q=planes.q.stride(0),
        stride_d=planes.d.stride(0),
        stride_sub=planes.sub.stride(0) if planes.sub is not None else 0,
        FOUR_BIT=planes.four_bit,
        GROUP=planes.group,
        SUPER=planes.super_block,
        HAS_SUB=planes.sub is not None,
        MIN_MODE=0 if planes.dmin is None else (2 if planes.mins is None else 3),
        EIGHT_D=planes.qtype.id == Q4_0.id,
    )


def gguf_dequantize(planes: GGUFPlanes, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` (the kernel's own forming of the weights; equal to dequantize_planes in float32)."""
    require_triton()
    out = torch.empty((planes.rows, planes.cols), dtype=dtype, device=planes.q.device)
    block_n, block_k = 32, 256
    grid = (triton.cdiv(planes.rows, block_n), triton.cdiv(planes.cols, block_k))
    _gguf_dequantize_kernel[grid](
        out, planes.rows, planes.cols, **plane_args(planes), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4
    )
    return out


def dequantize_matmul(x: torch.Tensor, planes: GGUFPlanes) -> torch.Tensor:
    """x [M, K] @ W^T for many rows: W dequantized whole into x's dtype, then multiplied by cuBLAS."""
    return x @ gguf_dequantize(planes, x.dtype).t()


def gguf_matmul(x: torch.Tensor, planes: GGUFPlanes, tiles: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] (x's dtype) for W in planes [N, K]; `tiles` forces the in-kernel path's tiling."""
    m, k = x.shape
    n = planes.rows
    if planes.cols != k:
        raise ValueError(f"{planes.qtype.name} weight of {planes.cols} columns does not fit K={k}")
    require_triton()
    x = x.contiguous()
    if tiles is None and m >= DEQUANTIZE_MIN_ROWS and n * k <= DEQUANTIZE_MAX_WEIGHTS:
        return dequantize_matmul(x, planes)
    if tiles is None:
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 8  # (the interpreter's tests on the CPU)
        tiles = choose_tiles(m, n, k, sms)
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n), tiles.split_k)
    split = tiles.split_k > 1
    out = torch.empty((tiles.split_k, m, n) if split else (m, n), dtype=torch.float32 if split else x.dtype,
                      device=x.device)  # fmt: skip
    _gguf_matmul_kernel[grid](
        x,
        out,
        m,
        n,
        k,
        x.stride(0),
        m * n,
        **plane_args(planes),
        IEEE=x.dtype == torch.float32,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        SPLIT_K=tiles.split_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out.sum(dim=0).to(x.dtype) if split else out


if HAS_TRITON:

    @triton.jit
    def weights_tile(
        q_ptr, d_ptr, sub_ptr, dmin_ptr, mins_ptr, stride_q, stride_d, stride_sub, cols, col_ok, k0, K,
        FOUR_BIT: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, HAS_SUB: tl.constexpr,
        MIN_MODE: tl.constexpr, EIGHT_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """W[cols, k0 : k0 + BLOCK_K] in float32 ([BLOCK_N, BLOCK_K], 0 outside W): w = (d * sub) * q - offset."""
        col64 = cols.to(tl.int64)
        if FOUR_BIT:
            bk = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte_mask = col_ok[:, None] & (bk < K // 2)[None, :]
            b = tl.load(q_ptr + col64[:, None] * stride_q + bk[None, :], mask=byte_mask, other=0)
            q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            q_mask = col_ok[:, None] & (ks < K)[None, :]
            q = tl.load(q_ptr + col64[:, None] * stride_q + ks[None, :], mask=q_mask, other=0).to(tl.float32)
        # The scales of this tile's groups [BLOCK_N, GROUPS], d read once per group (cached reads).
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        gk = k0 + tl.arange(0, GROUPS) * GROUP
        g_mask = col_ok[:, None] & (gk < K)[None, :]
        d_offs = col64[:, None] * stride_d + (gk // SUPER)[None, :]
        sub_offs = col64[:, None] * stride_sub + (gk // GROUP)[None, :]
        scale = tl.load(d_ptr + d_offs, mask=g_mask, other=0.0).to(tl.float32)
        if HAS_SUB:
            scale = scale * tl.load(sub_ptr + sub_offs, mask=g_mask, other=0).to(tl.float32)
        w = tl.reshape(q, (BLOCK_N, GROUPS, GROUP)) * scale[:, :, None]
        if EIGHT_D:
            w = w - (scale * 8)[:, :, None]
        if MIN_MODE >= 2:
            offset = tl.load(dmin_ptr + d_offs, mask=g_mask, other=0.0).to(tl.float32)
            if MIN_MODE == 3:
                offset = offset * tl.load(mins_ptr + sub_offs, mask=g_mask, other=0).to(tl.float32)
            w = w - offset[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _gguf_matmul_kernel(
        x_ptr, out_ptr, M, N, K, stride_xm, stride_split,
        q_ptr, d_ptr, sub_ptr, dmin_ptr, mins_ptr, stride_q, stride_d, stride_sub,
        FOUR_BIT: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, HAS_SUB: tl.constexpr,
        MIN_MODE: tl.constexpr, EIGHT_D: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_iters = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_iters, SPLIT_K)
        for it in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_iters)):
            k0 = it * BLOCK_K
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0
            )
            w = weights_tile(
                q_ptr, d_ptr, sub_ptr, dmin_ptr, mins_ptr, stride_q, stride_d, stride_sub, cols, col_ok, k0, K,
                FOUR_BIT, GROUP, SUPER, HAS_SUB, MIN_MODE, EIGHT_D, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            if IEEE:
                acc += tl.dot(a, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w.to(a.dtype)))
        out = out_ptr + pid_k * stride_split + rows[:, None] * N + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _gguf_dequantize_kernel(
        out_ptr, N, K,
        q_ptr, d_ptr, sub_ptr, dmin_ptr, mins_ptr, stride_q, stride_d, stride_sub,
        FOUR_BIT: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, HAS_SUB: tl.constexpr,
        MIN_MODE: tl.constexpr, EIGHT_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < N
        w = weights_tile(
            q_ptr, d_ptr, sub_ptr, dmin_ptr, mins_ptr, stride_q, stride_d, stride_sub, cols, col_ok, k0, K,
            FOUR_BIT, GROUP, SUPER, HAS_SUB, MIN_MODE, EIGHT_D, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        out = out_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & (ks < K)[None, :])
