"""Mixtral: the Llama/Mistral decoder with each MLP replaced by a sparse mixture of experts (top-k of E
SwiGLU experts, softmax routing renormalized over the chosen k).

Also the scaffolding every MoE family here shares (decoder layer, model, load_weights that stacks the
checkpoint's per-expert tensors): Qwen2-MoE and Qwen3-MoE (qwen_moe.py) differ only in their MoE block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.fused_moe import FusedMoE
from weir_server.layers.linear import ParallelLMHead, VocabParallelEmbedding, WeightSource, load_replicated
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import get_rope
from weir_server.models.llama import LlamaAttention, Rope, fused_name, head_dim_of, shards_of

# One expert's matrix in a checkpoint: Mixtral's w1/w3/w2 or Qwen-MoE's gate/up/down_proj.
_EXPERT = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
# transformers' in-memory layout (what `load_format="dummy"` draws): every expert stacked in one tensor.
# A GGUF file's experts come stacked too, gate and up apart (models/gguf_tensors.py names them so when it keeps them
# packed).
_STACKED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)$")
_STACKED_KIND = {"gate_up_proj": "gate_up", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_EXPERT_KIND = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}

MlpFactory = Callable[[Any, int], nn.Module]  # (config, layer index) -> the layer's feed-forward block


class MixtralSparseMoeBlock(nn.Module):
    """Router (a replicated linear map to expert logits) and the experts; renormalized top-k."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts = config.num_local_experts
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(
            num_experts, config.num_experts_per_tok, config.hidden_size, config.intermediate_size, renormalize=True
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden))


class MoeDecoderLayer(nn.Module):
    """Llama's pre-norm block (attention from llama.py) around the family's feed-forward block."""

    def __init__(self, config: Any, layer_idx: int, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = mlp
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


class MoeModel(nn.Module):
    """Embedding, decoder layers (each with the block `make_mlp` builds for it), final norm."""

    def __init__(self, config: Any, make_mlp: MlpFactory) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(config, i, make_mlp(config, i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config, head_dim_of(config))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.for_step(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class MoeForCausalLM(nn.Module):
    """The model contract of LlamaForCausalLM for a decoder whose MLPs are (partly) mixtures of experts.

    Subclasses give `make_mlp` and may rename checkpoint tensors in `checkpoint_name`.
    """

    shards_weights_on_load = True

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = MoeModel(config, self.make_mlp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_mlp(config: Any, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def checkpoint_name(hf_name: str) -> str:
        """A checkpoint tensor's name in our module tree (the identity unless the family renames blocks)."""
        return hf_name

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]; writes this step's K/V into kv_caches."""
        return self.model(input_ids, positions, kv_caches, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab] (gathered from every tensor-parallel rank)."""
        return self.lm_head.compute_logits(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> None:
        """Copy HF-named tensors in, this rank's slice of each: q/k/v and gate/up fused as in Llama, each
        expert's matrices into the layer's stacked expert weights; raise if any parameter stays unset."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            name, shard = _param_of(self.checkpoint_name(hf_name))
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
            owner = self.get_submodule(name.rpartition(".")[0])
            weight_loader = getattr(owner, "weight_loader", None)
            if weight_loader is None:
                load_replicated(param, tensor, hf_name)
            else:
                weight_loader(param, tensor, hf_name, shard)
            if isinstance(owner, FusedMoE):  # a stacked tensor fills every expert
                loaded.update(f"{name}:{s}" for s in owner.shards_filled(shard))
            else:
                loaded.add(f"{name}:{shard}")
        missing = [n for n in params for s in self._shards_of(n) if f"{n}:{s}" not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")

    def _shards_of(self, name: str) -> list[Any]:
        owner = self.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, FusedMoE):
            return list(owner.shards_of(name.rpartition(".")[2]))
        return list(shards_of(name))


def _param_of(hf_name: str) -> tuple[str, Any]:
    """Our parameter for a checkpoint tensor and the shard of it that tensor fills."""
    expert = _EXPERT.search(hf_name)
    if expert is not None:
        kind = _EXPERT_KIND[expert.group(2)]
        param = "w2_weight" if kind == "w2" else "w13_weight"
        return f"{hf_name[: expert.start()]}.experts.{param}", (int(expert.group(1)), kind)
    stacked = _STACKED_EXPERTS.search(hf_name)
    if stacked is not None:
        kind = _STACKED_KIND[stacked.group(1)]
        param = "w2_weight" if kind == "down" else "w13_weight"
        return f"{hf_name[: stacked.start()]}.experts.{param}", (None, kind)
    return fused_name(hf_name)


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: every layer's MLP is a renormalized top-k mixture of experts."""

    @staticmethod
    def make_mlp(config: Any, layer_idx: int) -> nn.Module:
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; Mixtral experts use 'silu'")
        return MixtralSparseMoeBlock(config)

    @staticmethod
    def checkpoint_name(hf_name: str) -> str:
        return hf_name.replace(".block_sparse_moe.", ".mlp.")  # transformers >= 5 names the block `mlp`
