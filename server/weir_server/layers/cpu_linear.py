"""Linear layers whose bf16 weights oneDNN reorders once, at start-up, rather than on every call.

A bf16 `F.linear` on CPU hands oneDNN a plain [out, in] matrix, which it copies into its blocked (AMX) layout
on each call; for a small model that copy costs about as much as the matmul. `pack_linear_layers` swaps a
loaded model's linear layers for `PackedLinear` (same math), its LM head for `PackedLMHead`, and a gated MLP's
fused gate/up projection plus `SiluAndMul` for `PackedGateUpSilu`, where oneDNN applies silu and the product
inside the matmuls instead of in separate passes over memory. A tied embedding whose rows the packed head holds as
the file's int8 blocks looks them up there (`PackedRowsEmbedding`) instead of keeping its own bf16 copy.

Steps of at most INT4_MAX_ROWS rows are bound by reading weights, so a layer whose weights are quantized keeps them
in that form too, for those steps: a GGUF layer loaded with a dense copy (layers/quantized_linear.py) brings its
blocks in the C++ ops' layouts (each fused part its own), and a weight that already sits on a 4-bit grid (a
dequantized Q4_0, Q4_1 or Q4_K tensor that came as floats) gets a 4-bit copy. Either reads 2-4x less than bf16.
"""

from __future__ import annotations

import functools
import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.activation import SiluAndMul
from weir_server.layers.gguf_weights import (
    INT4_MAX_ROWS,
    INT8_OP_MAX_ROWS,
    Int4Rows,
    Int4Weight,
    Int8BlockRows,
    RowsForm,
    op_layout_rows,
)
from weir_server.layers.linear import VocabParallelEmbedding
from weir_server.layers.quantized_linear import GGUFLinear, describe_parts

logger = logging.getLogger(__name__)

# oneDNN picks the blocked layout for a typical row count; any count runs on it (decode batches are small).
_ROWS_HINT = 32
_INT4_GROUP = 32  # the group of GGUF's Q4_0/Q4_1 blocks and Q4_K's sub-blocks, along the input dim
# A 4-bit copy is kept only where it reproduces the loaded weights: its error must stay under this fraction of
# a quantization step (bf16 rounding of a Q4 checkpoint gives ~0.08; requantizing real bf16 weights ~0.5).
_INT4_MAX_STEP_ERROR = 0.15


@functools.cache
def packing_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear ops (they are what torch.compile's CPU path uses)."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)


@functools.cache
def int4_available() -> bool:
    """Whether this torch build has the CPU 4-bit weight-only matmul (the one torchao's int4 CPU path uses)."""
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def _grid_fit(w: torch.Tensor, levels: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Groups w [G, 32] on a min/max grid of levels + 1 values: (q, scale, zero in `dtype`, which groups it
    reproduces within _INT4_MAX_STEP_ERROR of a step)."""
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((w - low) / scale).round_().clamp_(0, levels)
    scale16, zero16 = scale.to(dtype), (low + 8 * scale).to(dtype)  # the kernels' (q - 8) * s + z
    restored = (q - 8) * scale16.float() + zero16.float()
    fits = ((restored - w).abs() <= _INT4_MAX_STEP_ERROR * scale).all(-1)
    return q, scale16, zero16, fits


# At most this share of groups may need fewer than 16 levels: Q4_K's six-bit sub-block scales leave some of its
# groups short of a full range (7 in 27,648 in a llama-quantize Q4_K_M of SmolLM2, 6% from the tests' simpler
# quantizer), while a checkpoint that is not on a 4-bit grid misses in nearly every group, and is turned away
# after one pass.
_MAX_SHORT_GROUPS = 0.25


def lossless_int4(weight: torch.Tensor) -> Int4Weight | None:
    """A 4-bit copy (groups of 32) of a weight already on that grid, such as a dequantized Q4_0, Q4_1 or Q4_K GGUF
    tensor; None where it would change the weights (any ordinary bf16 or fp32 checkpoint). A group spanning fewer
    than 16 levels (a Q4_K sub-block whose quants stop short of 0 or 15) is fitted with the levels it spans."""
    rows, cols = weight.shape
    if not int4_available() or cols % _INT4_GROUP:
        return None
    w = weight.detach().float().reshape(-1, _INT4_GROUP)
    q, scale16, zero16, fits = _grid_fit(w, 15, weight.dtype)
    short = (~fits).nonzero()[:, 0]
    if len(short) > _MAX_SHORT_GROUPS * len(w):
        return None
    for levels in range(14, 0, -1):
        if len(short) == 0:
            break
        q_s, scale_s, zero_s, fits_s = _grid_fit(w[short], levels, weight.dtype)
        done = short[fits_s]
        q[done], scale16[done], zero16[done] = q_s[fits_s], scale_s[fits_s], zero_s[fits_s]
        short = short[~fits_s]
    if len(short):
        return None
    try:
        return Int4Weight(q.reshape(rows, cols).to(torch.uint8), scale16.reshape(rows, -1), zero16.reshape(rows, -1))
    except RuntimeError as error:  # a shape the kernel does not take
        logger.info("no 4-bit copy of a [%d, %d] weight: %s", rows, cols, error)
        return None


def _few_rows(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] <= INT4_MAX_ROWS


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # no fused post-op


def _parts_matmul(
    parts: nn.ModuleList, x: torch.Tensor, bias: torch.Tensor | None, silu_and_mul: bool = False
) -> torch.Tensor:
    """x times a GGUF layer's parts (concatenated by output row), plus bias, and for a [gate; up] weight
    silu(gate) * up; one part in a C++ layout forms that product inside its op."""
    flat = x.contiguous()
    only = parts[0] if len(parts) == 1 else None
    if silu_and_mul and bias is None and isinstance(only, Int4Rows | Int8BlockRows) and only.packed is not None:
        op = cpu_ops().int4_group_matmul if isinstance(only, Int4Rows) else cpu_ops().int8_packed_matmul  # type: ignore[union-attr]
        return op(flat, only.packed, silu_and_mul=True)  # type: ignore[no-any-return]
    outs = [cast(RowsForm, part).matmul(flat) for part in parts]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if bias is not None:
        out = out + bias
    if not silu_and_mul:
        return out
    gate, up = out.chunk(2, dim=-1)
    return F.silu(gate) * up


def _op_parts(parts: nn.ModuleList | None) -> nn.ModuleList | None:
    """`parts` where every one holds a C++ op's layout (the others, float rows or raw blocks, are slower than the
    packed bf16 copy at any row count), else None."""
    if parts is None or not all(isinstance(p, Int4Rows | Int8BlockRows) and p.packed is not None for p in parts):
        return None
    return parts


def _few_row_form(weight: torch.Tensor, parts: nn.ModuleList | None) -> tuple[Int4Weight | None, nn.ModuleList | None]:
    """What steps of a few rows read: a GGUF layer's parts where they all hold a C++ op's layout, else a lossless
    4-bit copy of the weight where there is one."""
    usable = _op_parts(parts)
    return (None, usable) if usable is not None else (lossless_int4(weight), None)


def _few_rows_repr(module: nn.Module) -> str:
    if getattr(module, "parts", None) is not None:
        return f", [{describe_parts(list(module.parts))}] for small batches"
    return ", int4 for small batches" if getattr(module, "int4_weight", None) is not None else ""


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout; inference only (the packed weight is no Parameter). `parts`:
    a GGUF layer's blocks (quantized_linear.GGUFLinear.parts) for steps of a few rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = _pack(weight)
        self.int4_weight, self.parts = _few_row_form(weight, parts)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _few_rows(x):
            if self.int4_weight is not None:
                return self.int4_weight.matmul(x, self.bias)
            if self.parts is not None:
                return _parts_matmul(self.parts, x, self.bias)
        return _packed_matmul(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        few = _few_rows_repr(self)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{few}"


class PackedGateUpSilu(nn.Module):
    """silu(x W_gate^T) * (x W_up^T) for a [gate | up] weight: two packed matmuls with the activation and the
    product as oneDNN post-ops. Replaces a gate/up projection whose `SiluAndMul` becomes an identity."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0] // 2
        gate, up = weight.detach().chunk(2, dim=0)
        self.packed_gate, self.packed_up = _pack(gate.contiguous()), _pack(up.contiguous())
        gate_bias, up_bias = (None, None) if bias is None else bias.detach().chunk(2)
        self.gate_bias, self.up_bias = gate_bias, up_bias
        self.bias = None if bias is None else bias.detach()
        self.int4_weight, self.parts = _few_row_form(weight, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _few_rows(x):
            if self.int4_weight is not None:
                return self.int4_weight.silu_and_mul(x, self.bias)
            if self.parts is not None:
                return _parts_matmul(self.parts, x, self.bias, silu_and_mul=True)
        gate = torch.ops.mkldnn._linear_pointwise(x, self.packed_gate, self.gate_bias, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.packed_up, self.up_bias, "mul")

    def extra_repr(self) -> str:
        few = _few_rows_repr(self)
        return f"in_features={self.in_features}, out_features={self.out_features} (silu(gate) * up){few}"


class PackedLMHead(nn.Module):
    """The output projection with a packed copy of its weight (the embedding keeps the plain one if tied), and
    where the GGUF file stored it as int8 blocks, those rows for steps of up to INT8_OP_MAX_ROWS rows (half the
    bytes of bf16, the file's exact values, and the same bits for a row whatever shares its step, as the 4-bit
    copies give). Groups of 32 (Q8_0, Q5_K) go to the integer-dot op's layout; others (Q6_K) keep theirs."""

    def __init__(
        self, weight: torch.Tensor, int8_rows: Int8BlockRows | None = None, parts: nn.ModuleList | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.packed_weight = _pack(weight)
        self.parts = _op_parts(parts)
        self.int8_rows, self.int8_packed = int8_rows, None
        ops = cpu_ops()
        if int8_rows is not None and ops is not None and int8_rows.group == 32 and int8_rows.rows % 8 == 0:
            self.int8_packed = ops.int8_pack(*int8_rows.plain_layout())
            self.int8_rows = None  # its bytes are freed unless a tied embedding still reads them

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype."""
        if hidden.shape[0] <= INT8_OP_MAX_ROWS:
            if self.parts is not None:
                return _parts_matmul(self.parts, hidden, None)
            if self.int8_packed is not None:
                return cpu_ops().int8_packed_matmul(hidden.contiguous(), self.int8_packed)  # type: ignore[no-any-return,union-attr]
            if self.int8_rows is not None and cpu_ops() is not None:
                return self.int8_rows.matmul(hidden)
        return _packed_matmul(hidden, self.packed_weight, None)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, hidden={self.embedding_dim}"


class PackedRowsEmbedding(nn.Module):
    """A tied embedding looked up in its packed head's int8 layout: the file's values, exact in float32 and rounded
    to the model's dtype as the loaded weight was, so the bf16 matrix (54 MiB for SmolLM2-135M) is not held twice
    beside the head's packed copy."""

    def __init__(self, packed: torch.Tensor, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.packed = packed  # the head's tensor, not a copy

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return op_layout_rows(self.packed, input_ids, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows from the LM head's int8 layout"


_CHECK_ROWS = 4096  # rows of a tied embedding compared with the head's int8 layout at once


def _embedding_from_head(weight: torch.Tensor, head: PackedLMHead) -> PackedRowsEmbedding | None:
    """A lookup in `head`'s int8 layout for the embedding whose weight `weight` is, or None where the head has no
    such layout or it does not give back every row of `weight` bit for bit."""
    if head.int8_packed is None or head.num_embeddings % 8:
        return None
    embedding = PackedRowsEmbedding(head.int8_packed, head.num_embeddings, head.embedding_dim, weight.dtype)
    for start in range(0, head.num_embeddings, _CHECK_ROWS):
        ids = torch.arange(start, min(start + _CHECK_ROWS, head.num_embeddings))
        if not torch.equal(embedding(ids), weight[start : start + len(ids)]):
            return None
    return embedding


def _share_tied_embedding(model: nn.Module, weight: torch.Tensor, head: PackedLMHead) -> None:
    """Swap the (one-rank) embedding tied to a packed head's `weight` for a lookup in the head's int8 layout."""
    for name, module in list(model.named_modules()):
        if type(module) is VocabParallelEmbedding and module.weight is weight and module.tp_size == 1:
            embedding = _embedding_from_head(weight, head)
            if embedding is None:
                return
            owner_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner_name), attr, embedding)
            logger.info("tied embedding: rows looked up in the LM head's int8 layout")


def _packable(module: nn.Module) -> bool:
    """A whole (not tensor-parallel-split) bf16 CPU weight of a plain linear map (a GGUF layer's dense copy)."""
    weight = module.dense_weight if isinstance(module, GGUFLinear) else getattr(module, "weight", None)
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
    # Names first, then one swap at a time, so each plain weight is freed as soon as its packed copy exists. The
    # head goes first: a tied embedding's bf16 matrix is then freed before the other layers add their 4-bit copies.
    names = sorted((name for name, _ in model.named_modules() if name), key=lambda name: name != "lm_head")
    count = 0
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        module = getattr(owner, attr)
        if not _packable(module):
            continue
        gguf = isinstance(module, GGUFLinear)
        weight, parts = (module.dense_weight, module.parts) if gguf else (module.weight, None)
        if attr == "gate_up_proj" and isinstance(getattr(owner, "act_fn", None), SiluAndMul):
            setattr(owner, attr, PackedGateUpSilu(weight, module.bias, parts))
            owner.act_fn = nn.Identity()
        elif isinstance(module, nn.Linear) or (gguf and not module.lm_head):
            setattr(owner, attr, PackedLinear(weight, module.bias, parts))
        elif attr == "lm_head" and hasattr(module, "compute_logits"):  # a tied GGUF embedding keeps its parts
            head = PackedLMHead(weight, getattr(module, "int8_rows", None), parts)  # type: ignore[arg-type]
            setattr(owner, attr, head)
            _share_tied_embedding(model, weight, head)
        else:
            continue
        count += 1
    return count
