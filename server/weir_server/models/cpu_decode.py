"""Every decoder layer of a Llama-shaped model in one C++ call, for CPU steps of a few tokens per sequence.

At one stream the packaged model's decode step spends about 5.5 ms in its kernels and about 3 ms in Python around
them: some 330 module calls, splits and views. `decode_layers` (kernels/cpu/decode_ops.cpp) calls the same C++ ops
on the same tensors in the same order, so a step through it gives the module path's bits; the modules stay the
path for everything else (prefill, larger batches, LoRA, tensor parallelism, any layer it does not cover).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.attention import CPU_OP_MAX_QUERY_LEN, cpu_op_fits
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.cpu_linear import INT4_MAX_ROWS, Int4Weight, PackedGateUpSilu, PackedLinear
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import StepRope


def _packed_int4(module: nn.Module, kind: type[nn.Module]) -> torch.Tensor | None:
    """The C++ op's 4-bit weight of a bias-free packed projection of exactly `kind`, else None."""
    if type(module) is not kind or getattr(module, "bias", None) is not None:
        return None
    weight = getattr(module, "int4_weight", None)
    return weight.packed if isinstance(weight, Int4Weight) else None


def _plain_norm(module: nn.Module) -> torch.Tensor | None:
    return module.weight if type(module) is RMSNorm else None


@dataclass(frozen=True)
class CpuDecodeLayers:
    """The layers' weights in `decode_layers`' order (per layer: input norm, qkv, o, post norm, gate/up, down)."""

    weights: list[torch.Tensor]
    windows: list[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float
    softcap: float
    dtype: torch.dtype

    @classmethod
    def build(cls, layers: Sequence[nn.Module]) -> CpuDecodeLayers | None:
        """A plan for Llama decoder layers whose projections all hold the C++ op's 4-bit weights and whose norms
        and attention are the plain ones (no q/k norm, no biases, no LoRA wrapper); None otherwise."""
        if cpu_ops() is None or not layers:
            return None
        weights: list[torch.Tensor] = []
        windows: list[int] = []
        first = layers[0].self_attn

        def shape(attn: nn.Module) -> tuple[object, ...]:
            return attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.attn.scale, attn.attn.logit_softcap

        for layer in layers:
            attn = layer.self_attn
            parts = (
                _plain_norm(layer.input_layernorm),
                _packed_int4(attn.qkv_proj, PackedLinear),
                _packed_int4(attn.o_proj, PackedLinear),
                _plain_norm(layer.post_attention_layernorm),
                _packed_int4(layer.mlp.gate_up_proj, PackedGateUpSilu),
                _packed_int4(layer.mlp.down_proj, PackedLinear),
            )
            if any(part is None for part in parts) or getattr(attn, "qk_norm", False):
                return None
            if shape(attn) != shape(first) or layer.input_layernorm.eps != layers[0].input_layernorm.eps:
                return None  # one call takes one head layout, scale and eps
            weights.extend(part for part in parts if part is not None)
            windows.append(attn.attn.sliding_window or 0)
        return cls(
            weights=weights,
            windows=windows,
            num_heads=first.num_heads,
            num_kv_heads=first.num_kv_heads,
            head_dim=first.head_dim,
            eps=layers[0].input_layernorm.eps,
            scale=first.attn.scale,
            softcap=first.attn.logit_softcap or 0.0,
            dtype=layers[0].input_layernorm.weight.dtype,
        )

    def fits(
        self, hidden: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata, rope: StepRope
    ) -> bool:
        """Whether the module path would take the C++ ops in every layer for this step (the same conditions)."""
        return (
            hidden.dim() == 2
            and hidden.shape[0] <= INT4_MAX_ROWS
            and hidden.dtype == self.dtype
            and hidden.is_contiguous()
            and attn.max_query_len <= CPU_OP_MAX_QUERY_LEN
            and cpu_op_fits(hidden, kv_caches[0], attn, rope)
        )

    def run(
        self, hidden: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata, rope: StepRope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] after the embedding -> (hidden, residual) before the final norm."""
        cos, sin = rope.flat_cos_sin()
        return cpu_ops().decode_layers(  # type: ignore[no-any-return,union-attr]
            hidden, None, self.weights, kv_caches, cos, sin, attn.block_tables, attn.context_lens,
            attn.query_start_loc, attn.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim, self.eps,
            self.scale, self.windows, self.softcap,
        )  # fmt: skip
