"""BERT encoder (e.g. all-MiniLM-L6-v2) returning token states for a padded batch; no KV cache."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# HF BertModel names -> ours (each encoder layer flattened into one module per sublayer).
_RENAMES = [
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.qkv.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn_out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
]
# Heads of BertForMaskedLM / BertForPreTraining and the pooler: not part of the token states.
_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")
_QKV = ("query", "key", "value")


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertLayer(nn.Module):
    """Post-norm encoder block: bidirectional attention, then the feed-forward, each with residual + LayerNorm."""

    def __init__(self, config: Any) -> None:
        # Here, not at the top: the registry imports this module in every engine process, and transformers'
        # activations module pulls in torch.distributed.tensor and sympy (55 MiB). Other processes then load them
        # only where transformers itself does (Llama's config class; the model that maps a GGUF file's names).
        from transformers.activations import ACT2FN

        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv = nn.ModuleDict({name: nn.Linear(hidden, hidden) for name in _QKV})
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.ffn_out = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, hidden], mask [B, 1, 1, L] bool (True = real token)."""
        batch, length, hidden = x.shape
        q, k, v = (self.qkv[n](x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for n in _QKV)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attn_norm(x + self.attn_out(attn))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertModel(nn.Module):
    """input_ids, attention_mask, token_type_ids [B, L] -> last hidden states [B, L, hidden]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"unsupported position_embedding_type {position_type!r}; only 'absolute'")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in (`bert.`-prefixed or bare, old gamma/beta names too); raise on gaps."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = _our_name(hf_name)
            if name is None:
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in BertModel")
            if param.shape != tensor.shape:
                raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def _our_name(hf_name: str) -> str | None:
    """Our parameter name for an HF BERT tensor, or None for tensors we do not use."""
    name = hf_name.removeprefix("bert.")
    if _IGNORED.match(name):
        return None
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    for pattern, replacement in _RENAMES:
        name, count = re.subn(pattern, replacement, name)
        if count:
            break
    return name
