"""Qwen2-MoE and Qwen3-MoE: Qwen2 / Qwen3 decoders (q/k/v bias; per-head q/k norm) whose MLPs are mixtures of
experts, top-k renormalized only when `norm_topk_prob`. Qwen2-MoE adds a shared expert every token passes
through, scaled by a sigmoid gate. Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step`
stride, keep a dense MLP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from weir_server.layers.fused_moe import FusedMoE
from weir_server.models.llama import LlamaMLP
from weir_server.models.mixtral import MoeForCausalLM


class Qwen2MoeSparseMoeBlock(nn.Module):
    """Router and routed experts, plus (Qwen2-MoE) a shared expert gated per token by sigmoid(x W_g)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedMoE(
            config.num_experts,
            config.num_experts_per_tok,
            config.hidden_size,
            config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
        )
        shared_size = getattr(config, "shared_expert_intermediate_size", 0) or 0
        self.shared_expert = LlamaMLP(config, shared_size) if shared_size else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared_size else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            # Under tensor parallelism the shared expert's down projection all-reduces on its own: two
            # all-reduces per sparse layer instead of one.
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out


def _is_sparse(config: Any, layer_idx: int) -> bool:
    """transformers' rule for which layers get experts."""
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2-MoE: routed experts plus the gated shared expert; q/k/v bias (`qkv_bias`)."""

    @staticmethod
    def make_mlp(config: Any, layer_idx: int) -> nn.Module:
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; Qwen-MoE experts use 'silu'")
        return Qwen2MoeSparseMoeBlock(config) if _is_sparse(config, layer_idx) else LlamaMLP(config)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE: its config has no shared expert, and LlamaAttention adds q/k norm for its model type."""
