"""Gemma 2 and Gemma 3 (text) decoders over the paged KV cache.

Both differ from Llama in the same ways: embeddings scaled by sqrt(hidden_size), GeGLU, RMSNorm with a (1 + weight)
scale, a norm after attention and one on each side of the MLP, `query_pre_attn_scalar` as the attention scale,
and interleaved sliding-window and global layers. Gemma 2 adds tanh soft-capping of attention scores and of the
final logits; Gemma 3 adds per-head q/k norms and a RoPE base of its own for the sliding-window layers.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from weir_server.layers.activation import GeluAndMul
from weir_server.layers.attention import PagedAttention
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from weir_server.layers.norm import GemmaRMSNorm
from weir_server.layers.rotary import RotaryEmbedding, StepRope, get_rope
from weir_server.models.llama import LlamaForCausalLM, head_dim_of

SLIDING, FULL = "sliding_attention", "full_attention"

# transformers' activation names -> F.gelu's `approximate`.
_GELU_APPROXIMATION = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def layer_types(config: Any) -> list[str]:
    """Each layer's attention kind: the config's `layer_types`, else Gemma 2's alternation (sliding first) or
    Gemma 3's `sliding_window_pattern` (every Nth layer global)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    pattern = 2 if config.model_type == "gemma2" else int(getattr(config, "sliding_window_pattern", 6))
    return [SLIDING if (i + 1) % pattern else FULL for i in range(config.num_hidden_layers)]


def _rope_settings(config: Any) -> dict[str, dict[str, Any]]:
    """RoPE settings per layer kind: transformers 5 nests them per kind for Gemma 3; Gemma 2 (and older Gemma 3
    configs) have one flat set, with `rope_local_base_freq` as the sliding layers' base where given."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(FULL), dict):
        return {FULL: dict(params[FULL]), SLIDING: dict(params.get(SLIDING) or params[FULL])}
    flat = dict(params or getattr(config, "rope_scaling", None) or {})
    flat.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    local_base = getattr(config, "rope_local_base_freq", None)
    if local_base is None:
        return {FULL: flat, SLIDING: flat}
    return {FULL: flat, SLIDING: {"rope_type": "default", "rope_theta": float(local_base)}}


def _get_rope(config: Any, settings: dict[str, Any]) -> RotaryEmbedding:
    view = SimpleNamespace(rope_parameters=settings, max_position_embeddings=config.max_position_embeddings)
    return get_rope(view, head_dim_of(config))


class GemmaAttention(nn.Module):
    """Fused q/k/v, optional q/k norms (Gemma 3), RoPE, paged attention (soft-capped on Gemma 2), output projection."""

    def __init__(self, config: Any, layer_type: str) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=bias)
        self.qk_norm = config.model_type != "gemma2"
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        # transformers applies the attention soft-cap for Gemma 2 only, whatever a Gemma 3 config says.
        softcap = getattr(config, "attn_logit_softcapping", None) if config.model_type == "gemma2" else None
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=float(config.query_pre_attn_scalar) ** -0.5,
            sliding_window=config.sliding_window if layer_type == SLIDING else None,
            logit_softcap=float(softcap) if softcap else None,
        )

    def forward(
        self, rope: StepRope, hidden: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, kv_cache, attn, rope)
        return self.o_proj(out.reshape(-1, self.q_size))


class GemmaMLP(nn.Module):
    """GeGLU feed-forward with gate and up fused into one projection."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in _GELU_APPROXIMATION:
            raise ValueError(f"unsupported hidden_activation {act!r}; Gemma models use 'gelu_pytorch_tanh'")
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=False)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False)
        self.act_fn = GeluAndMul(_GELU_APPROXIMATION[act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    """Sandwich norms: each of attention and MLP is normed on the way in and on the way out, then added."""

    def __init__(self, config: Any, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = GemmaAttention(config, layer_type)
        self.mlp = GemmaMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        rope: StepRope,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, attn)
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        return self.post_feedforward_layernorm(hidden), residual


class GemmaModel(nn.Module):
    """Scaled embedding, decoder layers, final norm; one RoPE table per attention kind."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        types = layer_types(config)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, types[i]) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_embs = nn.ModuleDict({kind: _get_rope(config, s) for kind, s in _rope_settings(config).items()})
        self.normalizer = float(config.hidden_size) ** 0.5
        self._normalizers: dict[torch.dtype, float] = {}

    def embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden_size) rounded to the embedding dtype first, as transformers multiplies by it."""
        if dtype not in self._normalizers:
            self._normalizers[dtype] = float(torch.tensor(self.normalizer, dtype=dtype))
        return self._normalizers[dtype]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * self.embed_scale(hidden.dtype)
        ropes = {kind: emb.for_step(positions, hidden.dtype) for kind, emb in self.rotary_embs.items()}
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(ropes[layer.layer_type], hidden, residual, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class GemmaForCausalLM(nn.Module):
    """The contract model for Gemma 2 and Gemma 3 text; the config's model_type picks the differences."""

    shards_weights_on_load = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma configs with use_bidirectional_attention are encoders; Weir serves causal LMs")
        self.config = config
        self.model = GemmaModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        softcap = getattr(config, "final_logit_softcapping", None)
        self.final_logit_softcap = float(softcap) if softcap else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]; writes this step's K/V into kv_caches."""
        return self.model(input_ids, positions, kv_caches, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], soft-capped where the config says so."""
        logits = self.lm_head.compute_logits(hidden).float()
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    # The same HF names, fused the same way (q/k/v, gate/up) and sharded the same way as Llama's.
    load_weights = LlamaForCausalLM.load_weights


Gemma2ForCausalLM = GemmaForCausalLM
Gemma3ForCausalLM = GemmaForCausalLM
