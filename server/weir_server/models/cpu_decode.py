"""Every decoder layer of a Llama-shaped model in one C++ call, for CPU steps of a few tokens per sequence.

At one stream the packaged model's decode step spends about 5.5 ms in its kernels and about 3 ms in Python around
them: some 330 module calls, splits and views. `decode_layers` (kernels/cpu/decode_ops.cpp) calls the same C++ ops
on the same tensors in the same order, so a step through it gives the module path's bits; the modules stay the
path for everything else (prefill, larger batches, LoRA, tensor parallelism, any layer it does not cover).

A GGUF kept quantized (`--quantization gguf`) comes too where every projection's parts hold a C++ layout: Q4_0,
Q4_1 and Q4_K as int4, Q5_0, Q8_0, Q5_K and Q6_K as int8 (a fused projection mixing them runs part by part, as
its module does). Where gate and up are one part, the op forms silu(gate) * up in fp32 where the modules round
gate and up to bf16 first, so those steps agree with the module path to bf16's rounding, not in bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.activation import SiluAndMul
from weir_server.layers.attention import CPU_OP_MAX_QUERY_LEN, cpu_op_fits
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.cpu_linear import INT4_MAX_ROWS, Int4Weight, PackedGateUpSilu, PackedLinear
from weir_server.layers.gguf_weights import Int4Rows, Int8BlockRows
from weir_server.layers.norm import RMSNorm
from weir_server.layers.quantized_linear import GGUFLinear
from weir_server.layers.rotary import StepRope


def _packed_parts(module: nn.Module, kind: type[nn.Module]) -> list[torch.Tensor] | None:
    """The C++ op's weights (int4 or int8 layout) of a bias-free projection: a packed bf16 one of exactly `kind`
    with its 4-bit copy or GGUF parts, or a whole (one-rank) GGUF one, a weight per part (a fused q/k/v of Q4_K
    beside Q6_K has two). None otherwise."""
    if getattr(module, "bias", None) is not None:
        return None
    if type(module) is kind and module.parts is None:
        weight = getattr(module, "int4_weight", None)
        return [weight.packed] if isinstance(weight, Int4Weight) and weight.packed is not None else None
    if type(module) is not kind and (type(module) is not GGUFLinear or module.tp_size != 1):
        return None
    packed = [part.packed for part in module.parts if isinstance(part, Int4Rows | Int8BlockRows)]
    if len(packed) != len(module.parts) or any(p is None for p in packed):
        return None
    return packed  # type: ignore[return-value]


def _gate_up(mlp: nn.Module) -> list[torch.Tensor] | None:
    """The [gate; up] weight whose op applies silu(gate) * up: the packed layer's (its act_fn is gone), or a GGUF
    one followed by the plain SiluAndMul."""
    if type(mlp.gate_up_proj) is GGUFLinear and type(getattr(mlp, "act_fn", None)) is not SiluAndMul:
        return None
    return _packed_parts(mlp.gate_up_proj, PackedGateUpSilu)


def _plain_norm(module: nn.Module) -> torch.Tensor | None:
    return module.weight if type(module) is RMSNorm else None


@dataclass(frozen=True)
class CpuDecodeLayers:
    """The layers' weights in `decode_layers`' order (per layer: input norm, qkv, o, post norm, gate/up, down, the
    projections each as one or more packed parts) and each projection's number of parts."""

    weights: list[torch.Tensor]
    parts: list[int]
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
        """A plan for Llama decoder layers whose projections all hold the C++ op's int4 or int8 weights and whose
        norms and attention are the plain ones (no q/k norm, no biases, no LoRA wrapper); None otherwise."""
        if cpu_ops() is None or not layers:
            return None
        weights: list[torch.Tensor] = []
        parts: list[int] = []
        windows: list[int] = []
        first = layers[0].self_attn

        def shape(attn: nn.Module) -> tuple[object, ...]:
            return attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.attn.scale, attn.attn.logit_softcap

        for layer in layers:
            attn = layer.self_attn
            input_norm, post_norm = _plain_norm(layer.input_layernorm), _plain_norm(layer.post_attention_layernorm)
            qkv, o = _packed_parts(attn.qkv_proj, PackedLinear), _packed_parts(attn.o_proj, PackedLinear)
            gate_up, down = _gate_up(layer.mlp), _packed_parts(layer.mlp.down_proj, PackedLinear)
            if input_norm is None or post_norm is None or getattr(attn, "qk_norm", False):
                return None
            if qkv is None or o is None or gate_up is None or down is None:
                return None
            if shape(attn) != shape(first) or layer.input_layernorm.eps != layers[0].input_layernorm.eps:
                return None  # one call takes one head layout, scale and eps
            weights.extend((input_norm, *qkv, *o, post_norm, *gate_up, *down))
            parts.extend((len(qkv), len(o), len(gate_up), len(down)))
            windows.append(attn.attn.sliding_window or 0)
        return cls(
            weights=weights,
            parts=parts,
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
            hidden, None, self.weights, self.parts, kv_caches, cos, sin, attn.block_tables, attn.context_lens,
            attn.query_start_loc, attn.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim, self.eps,
            self.scale, self.windows, self.softcap,
        )  # fmt: skip
