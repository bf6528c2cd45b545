"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3) over the paged KV cache.

The differences between the family members are all read from the transformers config: Qwen2's q/k/v bias,
Qwen3's per-head q/k RMSNorm, Mistral's sliding window, tied embeddings, RoPE scaling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from weir_server.layers.activation import SiluAndMul
from weir_server.layers.attention import PagedAttention
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
    load_replicated,
)
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import StepRope, get_rope
from weir_server.models.cpu_decode import CpuDecodeLayers

# HF name fragment -> (our fused parameter, shard id for its weight_loader); q/k/v and gate/up each fill one
# fused parameter, per tensor-parallel rank.
_STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}

Rope = StepRope  # this step's rotary inputs, shared by every layer


def head_dim_of(config: Any) -> int:
    """Each attention head's width: `head_dim` where the config sets it, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(config: Any, layer_idx: int) -> int | None:
    """The layer's attention window: per `layer_types` when the config has them (Qwen2/3), else global (Mistral)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


class LlamaAttention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norm (Qwen3), RoPE, paged attention, output projection.

    Under tensor parallelism each rank holds num_heads / tp query heads and their KV heads.
    """

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = head_dim_of(config)
        attention_bias = bool(getattr(config, "attention_bias", False))
        # Qwen2 has biases on q/k/v only and no `attention_bias` field.
        qkv_bias = attention_bias or config.model_type == "qwen2" or bool(getattr(config, "qkv_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, total_kv_heads, qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=attention_bias)
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, sliding_window=_sliding_window(config, layer_idx)
        )

    def forward(
        self, rope: Rope, hidden: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, kv_cache, attn, rope)  # rotates q and k (fused with the cache write on CUDA)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with gate and up fused into one projection."""

    def __init__(self, config: Any, intermediate_size: int | None = None) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; Llama-family models use 'silu'")
        bias = bool(getattr(config, "mlp_bias", False))
        size = intermediate_size or config.intermediate_size  # MoE shared experts have their own size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried separately so each norm can fuse the residual add."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: Rope,
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
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config, head_dim_of(config))
        # Set by LlamaForCausalLM.prepare_cpu_decode once the CPU's weights are packed: decode steps' layers in
        # one C++ call.
        self.cpu_decode: CpuDecodeLayers | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.for_step(positions, hidden.dtype)  # shared by every layer
        if self.cpu_decode is not None and self.cpu_decode.fits(hidden, kv_caches, attn, rope):
            hidden, residual = self.cpu_decode.run(hidden, kv_caches, attn, rope)
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden, residual = layer(rope, hidden, residual, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The contract model: forward over a flattened batch of tokens, logits for chosen rows, HF-named weights."""

    # load_weights takes lazy safetensors slices too, so each tensor-parallel rank reads only its own rows.
    shards_weights_on_load = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        """hidden [N, hidden] -> float32 logits [N, vocab] (gathered from every tensor-parallel rank)."""
        return self.lm_head.compute_logits(hidden).float()

    def prepare_cpu_decode(self) -> bool:
        """After the CPU's weight packing: whether every layer can run decode steps in one C++ call (see
        models/cpu_decode.py), and if so, from now on they do."""
        self.model.cpu_decode = CpuDecodeLayers.build(self.model.layers)
        return self.model.cpu_decode is not None

    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> None:
        """Copy Hugging Face-named tensors in, this rank's slice of each, fusing q/k/v and gate/up; raise if any
        parameter stays unset."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue  # recomputed from the config
            if hf_name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            name, shard = fused_name(hf_name)
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
            owner = self.get_submodule(name.rpartition(".")[0])
            weight_loader = getattr(owner, "weight_loader", None)
            if weight_loader is None:
                load_replicated(param, tensor, hf_name)
            else:
                weight_loader(param, tensor, hf_name, shard)
            loaded.add(f"{name}:{shard}")
        missing = [n for n in params for s in shards_of(n) if f"{n}:{s}" not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def shards_of(name: str) -> tuple[str | int | None, ...]:
    """The checkpoint tensors that fill one of our parameters."""
    if ".qkv_proj." in name:
        return ("q", "k", "v")
    if ".gate_up_proj." in name:
        return (0, 1)
    return (None,)


def fused_name(hf_name: str) -> tuple[str, str | int | None]:
    """Map an HF parameter name to ours and the shard of the fused tensor it fills (None if unfused)."""
    for fragment, (fused, shard) in _STACKED.items():
        if fragment in hf_name:
            return hf_name.replace(fragment, fused), shard
    return hf_name, None
