"""Multi-LoRA: each token adds its own adapter's low-rank update, out[t] += B[s] (A[s] x[t]) with s = slots[t].

Punica's BGMV in two kernels: `shrink` (x [T, K] @ A[s]^T -> [T, S*R], float32) then `expand` (+= the slice of
that product belonging to each output row, @ B[s]^T). A layer fusing S projections (q/k/v, gate/up) keeps the
A of slice i in rows i*R:(i+1)*R of its [S*R, K] stack, and `row_offset[n]` (= slice of row n times R) tells the
expand which of them output row n reads. Tokens of slot -1 (the base model) are skipped. Padding ranks are zero.

The grouped (SGMV) pair also splits the shrink's K over programs (its partial sums, summed by the expand in a fixed
order) and reads each slot's rank in this layer from the device, so a slot whose adapter leaves the layer alone
costs nothing even inside a CUDA graph captured before that adapter was loaded.
"""

import numpy as np
import torch

from weir_server.kernels import HAS_TRITON, next_power_of_2, require_triton, tl, triton
from weir_server.kernels.launch import CompiledLaunch, aligned, int_class


def lora_ref(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    row_offset: torch.Tensor,
) -> torch.Tensor:
    """Reference, in place and per token: out [T, N] += (lora_b[s] * shrink[row_offset + r]) summed over r, where
    shrink = lora_a[s] @ x[t] and s = slots[t]; rows of slot -1 are left alone. Returns out."""
    rank = lora_b.shape[-1]
    used = (slots >= 0).nonzero().flatten()
    if used.numel() == 0:
        return out
    s = slots[used].long()
    shrink = torch.einsum("tk,trk->tr", x[used].float(), lora_a[s].float())  # [U, S*R]
    cols = row_offset.long()[:, None] + torch.arange(rank, device=x.device)  # [N, R]
    gathered = shrink[:, cols]  # [U, N, R]
    delta = (gathered * lora_b[s].float()).sum(-1)  # [U, N]
    out[used] = (out[used].float() + delta).to(out.dtype)
    return out


def lora_apply(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    row_offset: torch.Tensor,
) -> torch.Tensor:
    """Triton kernels, in place: what `lora_ref` computes. x [T, K], out [T, N], lora_a [L, S*R, K],
    lora_b [L, N, R], slots [T] (int), row_offset [N] int32. Captures in a CUDA graph (no host sync)."""
    require_triton()
    num_tokens, k = x.shape
    n = out.shape[1]
    sr, rank = lora_a.shape[1], lora_b.shape[2]
    if num_tokens == 0:
        return out
    if not (x.is_contiguous() and out.is_contiguous() and lora_a.is_contiguous() and lora_b.is_contiguous()):
        raise ValueError("lora_apply needs contiguous tensors")
    shrink = torch.empty((num_tokens, sr), dtype=torch.float32, device=x.device)
    block_r = min(next_power_of_2(sr), 64)
    _shrink_kernel[(num_tokens, triton.cdiv(sr, block_r))](
        x, lora_a, slots, shrink, k, sr, x.stride(0), lora_a.stride(0), lora_a.stride(1), shrink.stride(0),
        BLOCK_R=block_r, BLOCK_K=128,
    )  # fmt: skip
    block_n = 64
    _expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
        shrink, lora_b, slots, row_offset, out, n, rank, shrink.stride(0), lora_b.stride(0), lora_b.stride(1),
        out.stride(0), BLOCK_N=block_n, BLOCK_RANK=next_power_of_2(rank),
    )  # fmt: skip
    return out


if HAS_TRITON:

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, slots_ptr, out_ptr, K, SR, stride_x, stride_al, stride_ar, stride_o,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot < 0:
            return
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        a_rows = a_ptr + slot * stride_al + r[:, None] * stride_ar
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + token * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
            av = tl.load(a_rows + k[None, :], mask=(r[:, None] < SR) & (k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(out_ptr + token * stride_o + r, acc, mask=r < SR)

    @triton.jit
    def _expand_kernel(
        s_ptr, b_ptr, slots_ptr, offset_ptr, out_ptr, N, RANK, stride_s, stride_bl, stride_bn, stride_o,
        BLOCK_N: tl.constexpr, BLOCK_RANK: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if slot < 0:
            return
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_RANK)
        mask = (n[:, None] < N) & (r[None, :] < RANK)
        offset = tl.load(offset_ptr + n, mask=n < N, other=0)
        sv = tl.load(s_ptr + token * stride_s + offset[:, None] + r[None, :], mask=mask, other=0.0)
        bv = tl.load(b_ptr + slot * stride_bl + n[:, None] * stride_bn + r[None, :], mask=mask, other=0.0)
        delta = tl.sum(sv * bv.to(tl.float32), axis=1)
        out = out_ptr + token * stride_o + n
        previous = tl.load(out, mask=n < N, other=0.0).to(tl.float32)
        tl.store(out, (previous + delta).to(out_ptr.dtype.element_ty), mask=n < N)


SGMV_BLOCK_T = 16  # tokens of one slot per program (the rows of its tensor-core tiles)
# Split-K aims a decode step's shrink at this many programs: 256 rows of one adapter are 16 tiles, and 16 programs
# each reducing all of K left an H100's 132 SMs nearly idle. The expand sums the splits' partial products, so the
# result stays deterministic (no atomics) and each token's sum runs in the same order in any batch.
SGMV_SHRINK_PROGRAMS = 256
SGMV_MAX_SPLIT_K = 16
SGMV_MIN_SPLIT = 256  # the shortest stretch of K one split reduces
SGMV_EXPAND_PROGRAMS = 1024  # past this many, an expand program takes several tiles of output rows in turn


def lora_segments(slots: torch.Tensor, num_loras: int, block_t: int) -> tuple[torch.Tensor, ...]:
    """The step's tokens grouped by slot for `lora_apply_sgmv`, with torch ops a CUDA graph captures (no host
    sync): token order sorted by slot, tokens and programs per slot (slot -1 first, given no programs)."""
    group = slots.long() + 1  # 0 = the base model, s + 1 = slot s
    order = torch.argsort(group).to(torch.int32)
    counts = torch.zeros(num_loras + 1, dtype=torch.int32, device=slots.device)
    counts.scatter_add_(0, group, torch.ones_like(group, dtype=torch.int32))
    blocks = (counts + block_t - 1) // block_t
    blocks[:1].zero_()  # the base model's tokens get no programs (an in-place fill: no host scalar under capture)
    block_end = torch.cumsum(blocks, 0, dtype=torch.int32)
    token_start = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).to(torch.int32)
    return order, counts, block_end, token_start


def host_segments(seq_slots: list[int], seq_lens: list[int], num_loras: int, block_t: int) -> np.ndarray:
    """An eager step's per-token slots and `lora_segments` of them, computed on the host (the step's slots are
    known there) and packed into one int32 array: slots, order, counts, block_end, token_start, each padded to a
    multiple of 4 so every piece keeps 16-byte alignment. `split_segments` takes it apart after one copy. The same
    values as `lora_segments` on the device but for the order of tokens within a slot (ascending here), which no
    token's result depends on: each is its own row of the tile products."""
    slots = np.repeat(np.asarray(seq_slots, dtype=np.int64), seq_lens)
    group = slots + 1
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=num_loras + 1)
    blocks = (counts + block_t - 1) // block_t
    blocks[0] = 0
    pieces = (slots, order, counts, np.cumsum(blocks), np.cumsum(counts) - counts)
    packed = np.zeros(sum(_padded(len(piece)) for piece in pieces), dtype=np.int32)
    start = 0
    for piece in pieces:
        packed[start : start + len(piece)] = piece
        start += _padded(len(piece))
    return packed


def split_segments(packed: torch.Tensor, num_tokens: int, num_loras: int) -> tuple[torch.Tensor, ...]:
    """`host_segments`' array (on the device) as (slots, (order, counts, block_end, token_start)) views."""
    sizes = (num_tokens, num_tokens, num_loras + 1, num_loras + 1, num_loras + 1)
    views, start = [], 0
    for size in sizes:
        views.append(packed[start : start + size])
        start += _padded(size)
    return views[0], tuple(views[1:])


def _padded(n: int) -> int:
    return (n + 3) // 4 * 4


def sgmv_split_k(k: int, tiles: int) -> int:
    """How many stretches of K the shrink splits into, for `tiles` (token tiles x rank tiles) programs: enough to
    fill the GPU at decode sizes, one for prefills (their partial sums would cost more traffic than they save)."""
    return max(1, min(SGMV_MAX_SPLIT_K, k // SGMV_MIN_SPLIT, SGMV_SHRINK_PROGRAMS // max(tiles, 1)))


def lora_apply_sgmv(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    row_offset: torch.Tensor,
    block_n: int,
    segments: tuple[torch.Tensor, ...] | None = None,
    slot_ranks: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Punica's SGMV: `lora_apply` with tokens grouped by slot, so a program multiplies a tile of tokens of one
    adapter (tensor-core dots) and reads that adapter's matrices once per tile instead of once per token.
    `block_n` must divide every output slice (so a tile of output rows reads one slice's columns). `segments`:
    `lora_segments(slots, len(lora_a), SGMV_BLOCK_T)`, made once per step for all layers (or here). `slot_ranks`
    [L] int32: the rank each slot's adapter uses in this layer (0: it leaves the layer alone and its programs exit
    at once; the matrices past it must be zeros); None: every slot at the full rank. `split_k`: None picks one
    (`sgmv_split_k`); 1 reduces all of K in one program, as the kernel first did."""
    require_triton()
    num_tokens, k = x.shape
    n = out.shape[1]
    num_loras, sr, _ = lora_a.shape
    rank = lora_b.shape[2]
    if num_tokens == 0:
        return out
    block_t = SGMV_BLOCK_T
    order, counts, block_end, token_start = segments or lora_segments(slots, num_loras, block_t)
    if slot_ranks is None:
        slot_ranks = torch.full((num_loras,), rank, dtype=torch.int32, device=x.device)
    programs = triton.cdiv(num_tokens, block_t) + num_loras  # sum over slots of ceil(count / block_t), at most
    ieee = x.dtype == torch.float32
    block_seg = next_power_of_2(num_loras + 1)
    block_r = min(max(next_power_of_2(sr), 16), 64)
    block_k = 64
    r_tiles = triton.cdiv(sr, block_r)
    split = split_k or sgmv_split_k(k, programs * r_tiles)
    k_chunk = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_chunk)  # no empty splits: each one writes its partial sums
    partials = torch.empty((split, num_tokens, sr), dtype=torch.float32, device=x.device)
    n_tiles = triton.cdiv(n, block_n)
    tiles_per_program = max(1, min(8, n_tiles * programs // SGMV_EXPAND_PROGRAMS))
    block_rank = max(next_power_of_2(rank), 16)
    # What fixes both kernels' specialization besides the layer's shapes: the two ints that follow the token count
    # (SPLIT_K and TILES are never specialized) and the pointers' alignment (None: not all 16-byte aligned).
    key = None
    if aligned(x, out, lora_a, lora_b, slot_ranks, row_offset, partials, order, counts, block_end, token_start):
        key = (x.dtype, out.dtype, lora_a.dtype, lora_b.dtype, k, n, sr, rank, num_loras, x.stride(0),
               out.stride(0), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1), block_r,
               block_n, int_class(k_chunk), int_class(partials.stride(0)))  # fmt: skip
    _sgmv_shrink(
        key, (programs, r_tiles, split),
        x, lora_a, order, counts, block_end, token_start, slot_ranks, partials, k, k_chunk, sr, rank, num_loras,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), partials.stride(0), partials.stride(1),
        block_t, block_r, block_k, block_seg, ieee,
    )  # fmt: skip
    _sgmv_expand(
        key, (programs, triton.cdiv(n_tiles, tiles_per_program)),
        partials, lora_b, order, counts, block_end, token_start, slot_ranks, row_offset, out, n, rank, num_loras,
        partials.stride(0), partials.stride(1), lora_b.stride(0), lora_b.stride(1), out.stride(0), split,
        tiles_per_program, block_t, block_n, block_rank, block_seg, ieee,
    )  # fmt: skip
    return out


if HAS_TRITON:

    @triton.jit
    def _sgmv_tile(pid, counts_ptr, block_end_ptr, token_start_ptr, order_ptr, NUM_LORAS,
                   BLOCK_T: tl.constexpr, BLOCK_SEG: tl.constexpr):  # fmt: skip
        """Which slot program `pid` serves (NUM_LORAS: none) and its tile's token rows and mask."""
        segs = tl.arange(0, BLOCK_SEG)
        ends = tl.load(block_end_ptr + segs, mask=segs <= NUM_LORAS, other=2**30)
        seg = tl.sum((ends <= pid).to(tl.int32))  # ends[0] == 0, so seg >= 1: a slot's programs
        seg_c = tl.minimum(seg, NUM_LORAS)
        first_block = tl.load(block_end_ptr + seg_c - 1)
        count = tl.where(seg <= NUM_LORAS, tl.load(counts_ptr + seg_c), 0)  # past the last slot's tiles: none
        start = tl.load(token_start_ptr + seg_c)
        pos = (pid - first_block) * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = pos < count
        tokens = tl.load(order_ptr + start + pos, mask=valid, other=0)
        return seg - 1, tokens, valid

    @triton.jit
    def _sgmv_shrink_kernel(
        x_ptr, a_ptr, order_ptr, counts_ptr, block_end_ptr, token_start_ptr, ranks_ptr, out_ptr, K, K_CHUNK, SR,
        RANK, NUM_LORAS, stride_x, stride_al, stride_ar, stride_os, stride_o,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SEG: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        slot, tokens, valid = _sgmv_tile(
            tl.program_id(0), counts_ptr, block_end_ptr, token_start_ptr, order_ptr, NUM_LORAS, BLOCK_T, BLOCK_SEG
        )
        if slot >= NUM_LORAS:
            return
        slot_rank = tl.load(ranks_ptr + slot)
        if slot_rank == 0:  # this adapter leaves the layer alone (the expand skips it too)
            return
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = (r < SR) & (r % RANK < slot_rank)  # each slice's rows past the adapter's rank are zeros: unread
        k_start = tl.program_id(2) * K_CHUNK
        k_end = tl.minimum(k_start + K_CHUNK, K)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_x
        a_rows = a_ptr + slot.to(tl.int64) * stride_al + r[None, :] * stride_ar
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_rows + k[None, :], mask=valid[:, None] & (k[None, :] < k_end), other=0.0)
            av = tl.load(a_rows + k[:, None], mask=(k[:, None] < k_end) & live[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(xv, av, input_precision="ieee")
            else:
                acc += tl.dot(xv, av)
        out = out_ptr + tl.program_id(2) * stride_os + tokens.to(tl.int64)[:, None] * stride_o + r[None, :]
        tl.store(out, acc, mask=valid[:, None] & (r[None, :] < SR))

    # SPLIT_K and TILES follow the step's token count: as constants (or specialised at 1) every new count would
    # compile another kernel in the middle of serving (about a second each, in the first steps that use adapters).
    @triton.jit(do_not_specialize=["SPLIT_K", "TILES"])
    def _sgmv_expand_kernel(
        s_ptr, b_ptr, order_ptr, counts_ptr, block_end_ptr, token_start_ptr, ranks_ptr, offset_ptr, out_ptr, N, RANK,
        NUM_LORAS, stride_ss, stride_s, stride_bl, stride_bn, stride_o, SPLIT_K, TILES,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_SEG: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        slot, tokens, valid = _sgmv_tile(
            tl.program_id(0), counts_ptr, block_end_ptr, token_start_ptr, order_ptr, NUM_LORAS, BLOCK_T, BLOCK_SEG
        )
        if slot >= NUM_LORAS:
            return
        slot_rank = tl.load(ranks_ptr + slot)
        if slot_rank == 0:
            return
        r = tl.arange(0, BLOCK_RANK)
        rows = tokens.to(tl.int64)
        r_mask = r < slot_rank
        s_rows = s_ptr + rows[:, None] * stride_s + r[None, :]
        b_slot = b_ptr + slot.to(tl.int64) * stride_bl
        for t in range(TILES):
            n0 = (tl.program_id(1) * TILES + t) * BLOCK_N
            if n0 < N:
                n = n0 + tl.arange(0, BLOCK_N)
                offset = tl.load(offset_ptr + n0)  # one slice per tile of rows
                s_mask = valid[:, None] & r_mask[None, :]
                sv = tl.load(s_rows + offset, mask=s_mask, other=0.0)
                for split in range(1, SPLIT_K):  # the shrink's partial sums, in a fixed order
                    sv += tl.load(s_rows + split * stride_ss + offset, mask=s_mask, other=0.0)
                bv = tl.load(
                    b_slot + n[None, :] * stride_bn + r[:, None], mask=(n[None, :] < N) & r_mask[:, None], other=0.0
                )
                if IEEE:
                    delta = tl.dot(sv, bv.to(tl.float32), input_precision="ieee")
                else:
                    delta = tl.dot(sv.to(bv.dtype), bv)
                out = out_ptr + rows[:, None] * stride_o + n[None, :]
                mask = valid[:, None] & (n[None, :] < N)
                previous = tl.load(out, mask=mask, other=0.0).to(tl.float32)
                tl.store(out, (previous + delta).to(out_ptr.dtype.element_ty), mask=mask)

    # Launched through their compiled handles: an eager prefill step with adapters calls each once per LoRA layer.
    _sgmv_shrink = CompiledLaunch(_sgmv_shrink_kernel)
    _sgmv_expand = CompiledLaunch(_sgmv_expand_kernel)
