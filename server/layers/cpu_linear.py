"""Linear layers whose bf16 weights oneDNN reorders once, at start-up, rather than on every call.

A bf16 `F.linear` on CPU hands oneDNN a plain [out, in] matrix, which it copies into its blocked (AMX) layout
on each call; for a small model that copy costs about as much as the matmul. `pack_linear_layers` swaps a
loaded model's linear layers for `PackedLinear` (same math), its LM head for `PackedLMHead`, and a gated MLP's
fused gate/up projection plus `SiluAndMul` for `PackedGateUpSilu`, where oneDNN applies silu and the product
inside the matmuls instead of in separate passes over memory.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from weir_server.layers.activation import SiluAndMul

logger = logging.getLogger(__name__)

# oneDNN picks the blocked layout for a typical row count; any count runs on it (decode batches are small).
_ROWS_HINT = 32


@functools.cache
def packing_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear ops (they are what torch.compile's CPU path uses)."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # no fused post-op


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout; inference only (the packed weight is no Parameter)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = _pack(weight)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_matmul(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedGateUpSilu(nn.Module):
    """silu(x W_gate^T) * (x W_up^T) for a [gate | up] weight: two packed matmuls with the activation and the
    product as oneDNN post-ops. Replaces a gate/up projection whose `SiluAndMul` becomes an identity."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0] // 2
        gate, up = weight.detach().chunk(2, dim=0)
        self.packed_gate, self.packed_up = _pack(gate.contiguous()), _pack(up.contiguous())
        gate_bias, up_bias = (None, None) if bias is None else bias.detach().chunk(2)
        self.gate_bias, self.up_bias = gate_bias, up_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.ops.mkldnn._linear_pointwise(x, self.packed_gate, self.gate_bias, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.packed_up, self.up_bias, "mul")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (silu(gate) * up)"


class PackedLMHead(nn.Module):
    """The output projection with a packed copy of its weight (the embedding keeps the plain one if tied)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.packed_weight = _pack(weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype."""
        return _packed_matmul(hidden, self.packed_weight, None)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, hidden={self.embedding_dim}"


def _packable(module: nn.Module) -> bool:
    """A whole (not tensor-parallel-split) bf16 CPU weight of a plain linear map."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and getattr(module, "tp_size", 1) == 1
    )


def pack_linear_layers(model: nn.Module) -> int:
    """Swap the model's bf16 CPU linear layers (and an `lm_head` with `compute_logits`) for packed ones.

    Returns how many were swapped; 0 where oneDNN packing is unavailable. Call after the weights are loaded.
    """
    if not packing_available():
        return 0
    # Names first, then one swap at a time, so each plain weight is freed as soon as its packed copy exists.
    names = [name for name, _ in model.named_modules() if name]
    count = 0
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        module = getattr(owner, attr)
        if not _packable(module):
            continue
        if attr == "gate_up_proj" and isinstance(getattr(owner, "act_fn", None), SiluAndMul):
            setattr(owner, attr, PackedGateUpSilu(module.weight, module.bias))
            owner.act_fn = nn.Identity()
        elif isinstance(module, nn.Linear):
            setattr(owner, attr, PackedLinear(module.weight, module.bias))
        elif attr == "lm_head" and hasattr(module, "compute_logits"):
            setattr(owner, attr, PackedLMHead(module.weight))  # type: ignore[arg-type]
        else:
            continue
        count += 1
    return count
