"""Routed experts as two grouped GEMMs (vLLM's fused_moe design): the (token, slot) pairs are sorted by expert
and each expert's run padded to a multiple of BLOCK_M, so one program multiplies a block of rows that all go
to one expert. One launch does every expert's gate/up projection, one the down projection (scaled by the
routing weights); silu(gate) * up runs between them. No host syncs: the routing tensors have static sizes,
so the whole path can be captured in a CUDA graph.

`fused_experts_planes` is the same over GGUF experts kept as planes (`kernels.gguf_planes`): each tile of an
expert's weights is formed from its quants and scales inside the kernel, as the dense GGUF matmul does.

The reference is `weir_server.layers.fused_moe.fused_experts_torch` (on the dequantized stacks for planes).
"""

from __future__ import annotations

import torch

from weir_server.kernels import HAS_TRITON, require_triton, tl, triton
from weir_server.kernels.activation import silu_and_mul
from weir_server.kernels.gguf_matmul import plane_args
from weir_server.kernels.gguf_planes import GGUFPlanes


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_token_ids [P] int32, expert_ids [P / block_m] int32, num_tokens_post_padded
    [1] int32). sorted_token_ids holds flat (token * k + slot) indices grouped by expert, each expert's run
    padded to a multiple of block_m with T * k (a row no program writes); expert_ids names each block's expert.
    P = T * k + E * (block_m - 1), the most padding can need, so the sizes never depend on the routing."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    max_padded = num_pairs + num_experts * (block_m - 1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its size back to the host
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank_in_expert
    sorted_token_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_token_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=flat.device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_token_ids, expert_ids.to(torch.int32), padded_end[-1:].to(torch.int32)


def _block_config(num_pairs: int) -> dict[str, int]:
    """Small row blocks for decode (few rows per expert), larger ones for prefill."""
    if num_pairs <= 64:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


# An expert stack: bf16 weights [E, N, K], or GGUF planes of E * N rows (expert e's rows e * N .. (e + 1) * N).
Experts = torch.Tensor | tuple[GGUFPlanes, int]


def _grouped_gemm(
    a: torch.Tensor,
    w: Experts,
    c: torch.Tensor,
    topk_weights: torch.Tensor,
    routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    mul_routed_weight: bool,
    config: dict[str, int],
) -> None:
    """c[pair] = a[pair // top_k] @ w[expert(pair)]^T (times the pair's weight) for every routed pair."""
    sorted_token_ids, expert_ids, num_tokens_post_padded = routing
    n, k = (w.shape[1], w.shape[2]) if isinstance(w, torch.Tensor) else (w[0].rows // w[1], w[0].cols)
    grid = (triton.cdiv(sorted_token_ids.shape[0], config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    routed = (a, c, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
              n, k, sorted_token_ids.shape[0], topk_weights.numel(), a.stride(0), c.stride(0))  # fmt: skip
    if isinstance(w, torch.Tensor):  # the plane arguments unused: PLANES is off
        operands = dict(b_ptr=w, stride_be=w.stride(0), stride_bn=w.stride(1), stride_bk=w.stride(2), PLANES=False,
                        q_ptr=w, d_ptr=w, sub_ptr=w, dmin_ptr=w, mins_ptr=w, stride_q=0, stride_d=0, stride_sub=0,
                        FOUR_BIT=False, GROUP=32, SUPER=32, HAS_SUB=False, MIN_MODE=0, EIGHT_D=False)  # fmt: skip
    else:  # the bf16 stack's arguments unused
        operands = dict(b_ptr=w[0].q, stride_be=0, stride_bn=0, stride_bk=0, PLANES=True, **plane_args(w[0]))
    _fused_moe_kernel[grid](
        *routed, **operands, MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, num_warps=4, num_stages=3, **config
    )


def _fused(hidden: torch.Tensor, w13: Experts, w2: Experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
           num_experts: int, width: int) -> torch.Tensor:  # fmt: skip
    """Both grouped GEMMs with silu(gate) * up between them; `width` is 2I, the gate/up rows of one expert."""
    require_triton()
    num_tokens, top_k = topk_ids.shape
    hidden_size = hidden.shape[1]
    if num_tokens == 0:
        return hidden.new_empty((0, hidden_size))
    hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    config = _block_config(num_tokens * top_k)
    routing = moe_align_block_size(topk_ids, config["BLOCK_M"], num_experts)
    gate_up = hidden.new_empty((num_tokens * top_k, width))
    _grouped_gemm(hidden, w13, gate_up, weights, routing, top_k, False, config)
    act = silu_and_mul(gate_up)  # [T * k, I]
    out = hidden.new_empty((num_tokens * top_k, hidden_size))
    _grouped_gemm(act, w2, out, weights, routing, 1, True, config)
    return out.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)


def fused_experts(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Triton kernel: hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights/ids [T, k] -> [T, H] in
    hidden's dtype (float32 accumulation; the k expert outputs are summed in float32)."""
    return _fused(hidden, w13, w2, topk_weights, topk_ids, w13.shape[0], w13.shape[1])


def fused_experts_planes(
    hidden: torch.Tensor,
    w13: GGUFPlanes,
    w2: GGUFPlanes,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """`fused_experts` over GGUF experts as planes: w13 of E * 2I rows of H, w2 of E * H rows of I."""
    width = w13.rows // num_experts
    return _fused(hidden, (w13, num_experts), (w2, num_experts), topk_weights, topk_ids, num_experts, width)


if HAS_TRITON:
    from weir_server.kernels.gguf_matmul import weights_tile

    @triton.jit
    def _fused_moe_kernel(
        a_ptr, c_ptr, topk_weights_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
        N, K, EM, num_valid_tokens, stride_am, stride_cm,
        b_ptr, stride_be, stride_bn, stride_bk,
        q_ptr, d_ptr, sub_ptr, dmin_ptr, mins_ptr, stride_q, stride_d, stride_sub,
        PLANES: tl.constexpr, FOUR_BIT: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr,
        HAS_SUB: tl.constexpr, MIN_MODE: tl.constexpr, EIGHT_D: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, top_k: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """One block of routed rows times one column block of its expert: from the bf16 stack [E, N, K] (b_ptr),
        or with PLANES from GGUF planes of E * N rows (the expert's rows expert * N ..)."""
        # Grouped launch order: GROUP_M row blocks share each weight column block while it is in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(EM, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
        if pid_m * BLOCK_M >= num_tokens_post_padded:
            return  # past the last expert's padded run
        offs_token_id = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_token = tl.load(sorted_token_ids_ptr + offs_token_id).to(tl.int64)
        token_mask = offs_token < num_valid_tokens  # padding rows hold num_valid_tokens
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, tl.cdiv(K, BLOCK_K)):
            ks = step * BLOCK_K + tl.arange(0, BLOCK_K)
            a = tl.load(
                a_ptr + (offs_token[:, None] // top_k) * stride_am + ks[None, :],
                mask=token_mask[:, None] & (ks < K)[None, :],
                other=0.0,
            )
            if PLANES:
                w = weights_tile(
                    q_ptr, d_ptr, sub_ptr, dmin_ptr, mins_ptr, stride_q, stride_d, stride_sub, expert * N + offs_n,
                    offs_n < N, step * BLOCK_K, K, FOUR_BIT, GROUP, SUPER, HAS_SUB, MIN_MODE, EIGHT_D, BLOCK_N, BLOCK_K,
                )  # fmt: skip
                acc += tl.dot(a, tl.trans(w.to(a.dtype)))
            else:
                b = tl.load(
                    b_ptr + expert * stride_be + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(ks < K)[:, None] & (offs_n[None, :] < N),
                    other=0.0,
                )
                acc += tl.dot(a, b)
        if MUL_ROUTED_WEIGHT:
            routed = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)
            acc = acc * routed[:, None]
        c_ptrs = c_ptr + offs_token[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=token_mask[:, None] & (offs_n[None, :] < N))
