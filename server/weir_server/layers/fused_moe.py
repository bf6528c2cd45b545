"""Mixture-of-experts feed-forward: top-k routing and the routed experts' SwiGLU, with experts stacked per layer.

Each layer's experts live in two stacked weights, `w13_weight` [E, 2I, H] (gate rows, then up rows) and
`w2_weight` [E, H, I], as vLLM's FusedMoE holds them. Under tensor parallelism every rank keeps all experts
and I / tp of each one's intermediate features (column-parallel gate/up, row-parallel down), so a layer costs
one all-reduce, like the dense MLP. On CUDA the experts run as two Triton grouped GEMMs
(kernels/fused_moe.py); elsewhere as one matmul per expert over the tokens routed to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.distributed import parallel_state
from weir_server.distributed.communication import all_reduce
from weir_server.distributed.parallel_state import divide
from weir_server.kernels import HAS_TRITON
from weir_server.kernels.fused_moe import fused_experts
from weir_server.layers.linear import WeightSource, check_shape, read_slice

# A checkpoint tensor's place among the experts: (expert index, "w1" | "w3" | "w2") for one expert's gate, up
# or down matrix, or (None, "gate_up" | "down") for all experts' weights stacked ([E, 2I, H] / [E, H, I]), or
# (None, "gate" | "up") for all experts' gate or up matrices stacked ([E, I, H]: a GGUF file's own layout).
ExpertShard = tuple[int | None, str]
_STACKED_KINDS = {"gate_up": ("w1", "w3"), "gate": ("w1",), "up": ("w3",), "down": ("w2",)}


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64): softmax, then the top k,
    renormalized to sum to one when `renormalize` (Mixtral always; Qwen-MoE per `norm_topk_prob`)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_torch(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The reference and CPU path: token copies sorted by expert, one gate/up and one down matmul per expert
    over its rows, then each token's weighted sum. hidden [T, H] -> [T, H] in hidden's dtype."""

    def swiglu_expert(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, w13[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2[expert])

    return experts_by_rows(hidden, topk_weights, topk_ids, w13.shape[0], swiglu_expert)


def experts_by_rows(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    run_expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Token copies sorted by expert, `run_expert(e, rows)` once per expert over the rows routed to it, then
    each token's weighted sum in float32. hidden [T, H] -> [T, H] in hidden's dtype."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    rows = hidden[token_of]
    expert_out = torch.empty_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            expert_out[start : start + count] = run_expert(expert, rows[start : start + count])
            start += count
    weighted = expert_out.float() * topk_weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.zeros((num_tokens, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, token_of, weighted).to(hidden.dtype)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> torch.Tensor:
    """hidden [T, H], router_logits [T, E] -> the routed experts' weighted output [T, H] (this rank's partial
    sum under tensor parallelism); the Triton kernel on CUDA, the batched torch path elsewhere."""
    topk_weights, topk_ids = select_experts(router_logits, top_k, renormalize)
    if hidden.is_cuda and HAS_TRITON:
        return fused_experts(hidden, w13, w2, topk_weights, topk_ids)
    return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids)


class FusedMoE(nn.Module):
    """All of a layer's routed experts (SwiGLU each), stacked; forward takes the hidden states and the router
    logits and returns the weighted sum of each token's top-k experts, all-reduced over the ranks."""

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = parallel_state.tp_rank(), parallel_state.tp_size()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size = hidden_size
        self.full_intermediate_size = intermediate_size
        self.intermediate_size = divide(intermediate_size, self.tp_size, "the experts' intermediate size")
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate_size))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        out = fused_moe(hidden, self.w13_weight, self.w2_weight, router_logits, self.top_k, self.renormalize)
        return all_reduce(out) if self.tp_size > 1 else out

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Copy this rank's intermediate features of one expert's gate (w1), up (w3) or down (w2) matrix, or of
        every expert's stacked gate_up / down tensor, into place."""
        expert, kind = shard_id
        local, full, rank = self.intermediate_size, self.full_intermediate_size, self.tp_rank
        with torch.no_grad():
            if kind in ("w1", "w3"):
                check_shape(src, (full, self.hidden_size), name)
                offset = 0 if kind == "w1" else local
                param[expert, offset : offset + local].copy_(read_slice(src, 0, rank * local, local))
            elif kind == "w2":
                check_shape(src, (self.hidden_size, full), name)
                param[expert].copy_(read_slice(src, 1, rank * local, local))
            elif kind == "gate_up":
                check_shape(src, (self.num_experts, 2 * full, self.hidden_size), name)
                param[:, :local].copy_(read_slice(src, 1, rank * local, local))
                param[:, local:].copy_(read_slice(src, 1, full + rank * local, local))
            elif kind in ("gate", "up"):
                check_shape(src, (self.num_experts, full, self.hidden_size), name)
                offset = 0 if kind == "gate" else local
                param[:, offset : offset + local].copy_(read_slice(src, 1, rank * local, local))
            elif kind == "down":
                check_shape(src, (self.num_experts, self.hidden_size, full), name)
                param.copy_(read_slice(src, 2, rank * local, local))
            else:
                raise ValueError(f"{name}: unknown expert shard {shard_id!r}")

    def shards_of(self, param_name: str) -> list[ExpertShard]:
        """The per-expert checkpoint tensors that together fill parameter `param_name` (w13_weight or w2_weight)."""
        kinds = ("w1", "w3") if param_name == "w13_weight" else ("w2",)
        return [(expert, kind) for expert in range(self.num_experts) for kind in kinds]

    def shards_filled(self, shard_id: ExpertShard) -> list[ExpertShard]:
        """The per-expert shards a checkpoint tensor fills: itself, or every expert's for a stacked tensor."""
        expert, kind = shard_id
        if expert is not None:
            return [shard_id]
        return [(e, k) for e in range(self.num_experts) for k in _STACKED_KINDS[kind]]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size} (of {self.full_intermediate_size}), renormalize={self.renormalize}"
        )
