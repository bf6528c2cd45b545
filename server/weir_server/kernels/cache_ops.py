"""Writing this step's K/V into the paged cache, optionally fused with rotary embedding of q and k.

Slots are block * block_size + offset into a layer's cache [2, num_blocks, block_size, Hkv, D]; a negative
slot (a padding token of a CUDA-graph batch) is skipped. Rotary is Llama's neox style (rotate half):
`cos_sin_cache[position]` holds cos for the first rotary_dim/2 entries and sin for the rest, and only the
first rotary_dim dimensions of each head turn (partial rotary leaves the others alone).
"""

import torch

from weir_server.kernels import HAS_TRITON, next_power_of_2, require_triton, tl, triton


def reshape_and_cache_ref(
    k: torch.Tensor, v: torch.Tensor, kv_cache_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Reference: k, v [T, Hkv, D] into kv_cache_layer at slot_mapping [T], skipping negative slots."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_kv_heads, head_dim = kv_cache_layer.shape[-2:]
    for plane, src in ((0, k), (1, v)):
        flat = kv_cache_layer[plane].view(-1, num_kv_heads, head_dim)
        flat[slots] = src[keep].to(flat.dtype)


def rotate_neox_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated in float64: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the rotary dims."""
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].double().unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rot/2]
    x = x.double()
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def rotary_and_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache_layer: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    """Reference: rotate q [T, H, D] and k [T, Hkv, D] in place, then cache k, v (when a cache is given)."""
    q.copy_(rotate_neox_ref(q, positions, cos_sin_cache))
    k.copy_(rotate_neox_ref(k, positions, cos_sin_cache))
    if kv_cache_layer is not None and slot_mapping is not None:
        reshape_and_cache_ref(k, v, kv_cache_layer, slot_mapping)


def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton kernel: k, v [T, Hkv, D] into kv_cache_layer at slot_mapping [T], skipping negative slots."""
    _launch(None, k, v, None, None, kv_cache_layer, slot_mapping)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache_layer: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    """Triton kernel: rotate q and k in place (float32 math) and cache k, v; one program per token."""
    _launch(q, k, v, positions, cos_sin_cache, kv_cache_layer, slot_mapping)


def _launch(q, k, v, positions, cos_sin_cache, kv_cache_layer, slot_mapping) -> None:
    require_triton()
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    rotate = q is not None
    write = kv_cache_layer is not None and slot_mapping is not None
    for t in (q, k, v):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("q, k and v need a contiguous last dimension")
    rot = cos_sin_cache.shape[-1] if rotate else 0
    cache = kv_cache_layer if write else k.new_empty((2, 1, 1, 1, 1))
    dummy = k.new_empty(1, dtype=torch.int64)
    num_heads = q.shape[1] if rotate else 1
    _cache_kernel[(num_tokens,)](
        q if rotate else k,
        k,
        v,
        positions if rotate else dummy,
        cos_sin_cache if rotate else dummy,
        cache[0],
        cache[1],
        slot_mapping if write else dummy,
        q.stride(0) if rotate else 0,
        q.stride(1) if rotate else 0,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0) if rotate else 0,
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=next_power_of_2(max(num_heads, num_kv_heads)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=cache.shape[2],
        HALF_ROT=rot // 2,
        HALF_ROT_PAD=next_power_of_2(rot // 2),
        TAIL_PAD=next_power_of_2(head_dim - rot),
        ROTATE=rotate,
        WRITE=write,
        num_warps=4,
    )


if HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        x_ptr,
        stride_h,
        num_heads,
        cos,
        sin,
        dst_ptr,
        dst_stride_h,
        write_dst,
        HEADS_PAD: tl.constexpr,
        HALF_ROT: tl.constexpr,
        HALF_ROT_PAD: tl.constexpr,
        HAS_DST: tl.constexpr,
    ):
        # Rotate the first 2*HALF_ROT dims of each head in place; also store them at dst when write_dst.
        heads = tl.arange(0, HEADS_PAD)[:, None]
        half = tl.arange(0, HALF_ROT_PAD)[None, :]
        mask = (heads < num_heads) & (half < HALF_ROT)
        first = x_ptr + heads * stride_h + half
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF_ROT, mask=mask, other=0.0).to(tl.float32)
        r1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
        r2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
        tl.store(first, r1, mask=mask)
        tl.store(first + HALF_ROT, r2, mask=mask)
        if HAS_DST:
            dst = dst_ptr + heads * dst_stride_h + half
            tl.store(dst, r1.to(dst_ptr.dtype.element_ty), mask=mask & write_dst)
            tl.store(dst + HALF_ROT, r2.to(dst_ptr.dtype.element_ty), mask=mask & write_dst)

    @triton.jit
    def _copy_heads(
        src_ptr,
        src_stride_h,
        dst_ptr,
        dst_stride_h,
        first_dim,
        write_dst,
        NUM_HEADS: tl.constexpr,
        HEADS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIMS_PAD: tl.constexpr,
    ):
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = first_dim + tl.arange(0, DIMS_PAD)[None, :]
        mask = (heads < NUM_HEADS) & (dims < HEAD_DIM) & write_dst
        x = tl.load(src_ptr + heads * src_stride_h + dims, mask=mask)
        tl.store(dst_ptr + heads * dst_stride_h + dims, x.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cache_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        positions_ptr,
        cos_sin_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_cs,
        stride_cb,
        stride_ct,
        stride_ch,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HEADS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HALF_ROT: tl.constexpr,
        HALF_ROT_PAD: tl.constexpr,
        TAIL_PAD: tl.constexpr,
        ROTATE: tl.constexpr,
        WRITE: tl.constexpr,
    ):
        # One program per token. Rotated k goes to the cache from registers, so nothing is re-read.
        token = tl.program_id(0).to(tl.int64)
        if WRITE:
            slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        else:
            slot = tl.full([], -1, tl.int64)
        write = slot >= 0
        cache_off = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
        cache_off = tl.where(write, cache_off, 0)
        k_src = k_ptr + token * stride_kt
        if ROTATE:
            pos = tl.load(positions_ptr + token).to(tl.int64)
            half = tl.arange(0, HALF_ROT_PAD)[None, :]
            cos = tl.load(cos_sin_ptr + pos * stride_cs + half, mask=half < HALF_ROT, other=0.0).to(tl.float32)
            sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF_ROT + half, mask=half < HALF_ROT, other=0.0)
            sin = sin.to(tl.float32)
            q_src = q_ptr + token * stride_qt
            _rotate_heads(
                q_src, stride_qh, NUM_HEADS, cos, sin, q_src, stride_qh, write, HEADS_PAD, HALF_ROT, HALF_ROT_PAD, False
            )
            _rotate_heads(
                k_src,
                stride_kh,
                NUM_KV_HEADS,
                cos,
                sin,
                k_cache_ptr + cache_off,
                stride_ch,
                write,
                HEADS_PAD,
                HALF_ROT,
                HALF_ROT_PAD,
                WRITE,
            )
        # The dims rotary leaves alone (all of them without rotary), and all of v.
        if WRITE:
            _copy_heads(
                k_src,
                stride_kh,
                k_cache_ptr + cache_off,
                stride_ch,
                2 * HALF_ROT,
                write,
                NUM_KV_HEADS,
                HEADS_PAD,
                HEAD_DIM,
                TAIL_PAD,
            )
            _copy_heads(
                v_ptr + token * stride_vt,
                stride_vh,
                v_cache_ptr + cache_off,
                stride_ch,
                0,
                write,
                NUM_KV_HEADS,
                HEADS_PAD,
                HEAD_DIM,
                HEAD_DIM_PAD,
            )
