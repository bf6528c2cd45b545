"""OLMo 2 decoder over the paged KV cache: Llama's pieces with post-norms and q/k norms over all heads at once.

Each block normalizes its sublayer's output before the residual add (no pre-norms), and the q and k
projections are RMS-normalized over their whole width (all heads together), before RoPE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.distributed import parallel_state
from weir_server.distributed.communication import all_reduce
from weir_server.layers.attention import PagedAttention
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.linear import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
    read_slice,
    source_shape,
)
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import StepRope, get_rope
from weir_server.models.llama import LlamaForCausalLM, LlamaMLP, head_dim_of


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a feature dim split across tensor-parallel ranks like q or k heads (`replicas` ranks share
    a slice when KV heads are replicated); the sum of squares is all-reduced, so every rank divides by the
    full width's mean."""

    def __init__(self, local_size: int, full_size: int, replicas: int, eps: float) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = parallel_state.tp_rank(), parallel_state.tp_size()
        self.full_size, self.replicas, self.eps = full_size, replicas, eps
        self.weight = nn.Parameter(torch.ones(local_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        squares = x.float().pow(2).sum(-1, keepdim=True)
        # Replicated slices are summed `replicas` times: tp_size * local width counts them the same way.
        mean = all_reduce(squares) / (self.weight.shape[0] * self.tp_size)
        return (x.float() * torch.rsqrt(mean + self.eps)).to(x.dtype) * self.weight

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Copy the scales of this rank's heads."""
        if source_shape(src) != (self.full_size,):
            raise ValueError(f"{name}: checkpoint shape {source_shape(src)} != model ({self.full_size},)")
        size = param.shape[0]
        with torch.no_grad():
            param.copy_(read_slice(src, 0, (self.tp_rank // self.replicas) * size, size))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.full_size}, eps={self.eps}"


class Olmo2Attention(nn.Module):
    """Fused q/k/v projection, q/k RMSNorm over all heads, RoPE, paged attention, output projection."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        eps = config.rms_norm_eps
        self.q_norm = ShardedRMSNorm(self.q_size, total_heads * self.head_dim, 1, eps)
        self.k_norm = ShardedRMSNorm(self.kv_size, total_kv_heads * self.head_dim, self.qkv_proj.kv_replicas, eps)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self, rope: StepRope, hidden: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, kv_cache, attn, rope)
        return self.o_proj(out.reshape(-1, self.q_size))


class Olmo2DecoderLayer(nn.Module):
    """Post-norm block: x + norm(attn(x)), then x + norm(mlp(x))."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config)
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, rope: StepRope, hidden: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(rope, hidden, kv_cache, attn))
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden))


class Olmo2Model(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Olmo2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config, head_dim_of(config))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.for_step(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(rope, hidden, kv_cache, attn)
        return self.norm(hidden)


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2: Llama's head, forward and weight loading (HF names, fused q/k/v and gate/up) over Olmo2Model."""

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)  # Llama's __init__ would build a Llama body only to replace it
        self.config = config
        self.model = Olmo2Model(config)  # type: ignore[assignment]  # another body behind the same interface
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
