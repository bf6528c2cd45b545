"""IBM Granite (3.x): the Llama decoder with four scalars from the config.

`embedding_multiplier` scales the token embeddings, `attention_multiplier` replaces 1/sqrt(head_dim) as the
attention scale, `residual_multiplier` scales each sublayer's output before the residual add, and the logits
are divided by `logits_scaling`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.linear import ParallelLMHead, VocabParallelEmbedding
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import StepRope, get_rope
from weir_server.models.llama import LlamaDecoderLayer, LlamaForCausalLM, head_dim_of


class GraniteDecoderLayer(LlamaDecoderLayer):
    """Llama's block with Granite's attention scale, and sublayer outputs scaled before the residual add."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.self_attn.attn.scale = float(config.attention_multiplier)
        self.residual_multiplier = float(config.residual_multiplier)

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
        # The next norm adds its input to the residual, so scaling the output here is Granite's
        # `residual + multiplier * sublayer(x)`.
        hidden = self.self_attn(rope, hidden, kv_cache, attn) * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden) * self.residual_multiplier, residual


class GraniteModel(nn.Module):
    """Scaled embedding, decoder layers, final norm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embedding_multiplier = float(config.embedding_multiplier)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GraniteDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config, head_dim_of(config))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embedding_multiplier
        rope = self.rotary_emb.for_step(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite: Llama's head and weight loading over GraniteModel, logits divided by `logits_scaling`."""

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)  # Llama's __init__ would build a Llama body only to replace it
        self.config = config
        self.model = GraniteModel(config)  # type: ignore[assignment]  # Llama's head only calls its forward
        self.logits_scaling = float(config.logits_scaling)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], divided by the config's logits_scaling."""
        return super().compute_logits(hidden) / self.logits_scaling
