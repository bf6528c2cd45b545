"""AWQ and GPTQ checkpoint tensors to one 4-bit form, and back (the tests write checkpoints with `pack_awq` and
`pack_gptq`).

- AWQ (AutoAWQ GEMM): qweight int32 [K, N / 8] packed along the output dim in AWQ's interleaved nibble order
  (nibble i holds column 8j + AWQ_ORDER[i]), qzeros int32 [K / group, N / 8] packed the same way, scales [K / group, N].
- GPTQ (AutoGPTQ / GPTQModel): qweight int32 [K / 8, N] packed along the input dim in order, qzeros int32
  [G, N / 8] packed along the output dim in order, scales [G, N], g_idx int32 [K] (each input row's group; a
  permutation of the groups under act-order). Format `gptq` stores each zero minus one, `gptq_v2` the zero itself.

Both become `Int4Weight`: q uint8 [K, N] (input rows x output columns, as the checkpoints lay W out), the actual
zero points and the scales [G, N], and g_idx (None when row k is in group k // group_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weir_server.models.quant_config import QuantConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_ORDER = tuple(range(8))


@dataclass
class Int4Weight:
    """A 4-bit weight W [K, N] = (q - zeros[g]) * scales[g], unpacked but still integer."""

    q: torch.Tensor  # uint8 [K, N]
    zeros: torch.Tensor  # uint8 [G, N] (0..16: `gptq`'s stored 15 + 1)
    scales: torch.Tensor  # [G, N]
    g_idx: torch.Tensor | None  # int32 [K], None = contiguous groups


def unpack_columns(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [R, C / 8] packed along the last dim -> uint8 [R, C]."""
    shifts = 4 * torch.tensor([order.index(c) for c in range(8)], dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1).to(torch.uint8)


def pack_columns(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """uint8/int [R, C] in 0..15 -> int32 [R, C / 8], the inverse of `unpack_columns`."""
    rows, cols = values.shape
    shifts = 4 * torch.tensor([order.index(c) for c in range(8)], dtype=torch.int64)
    words = ((values.to(torch.int64) & 0xF).reshape(rows, cols // 8, 8) << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_weight(weight: Int4Weight, group_size: int) -> torch.Tensor:
    """W [K, N] in float32 (the tests' reference)."""
    groups = weight.g_idx.long() if weight.g_idx is not None else torch.arange(len(weight.q)) // group_size
    return (weight.q.float() - weight.zeros.float()[groups]) * weight.scales.float()[groups]


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, expected {shape} ({what})")


def read_int4(tensors: dict[str, torch.Tensor], quant: QuantConfig, in_features: int, name: str) -> Int4Weight:
    """One checkpoint projection's qweight, qzeros, scales (and g_idx) as an Int4Weight, shapes checked."""
    scales = tensors["scales"]
    if scales.dim() != 2:
        raise ValueError(f"{name}.scales: shape {tuple(scales.shape)} is not [groups, out_features]")
    groups, n = in_features // quant.group_size, scales.shape[1]
    label = f"{quant.method} group_size {quant.group_size}, in_features {in_features}"
    _expect(f"{name}.scales", scales, (groups, n), label)
    _expect(f"{name}.qzeros", tensors["qzeros"], (groups, n // 8), label)
    if quant.method == "awq":
        _expect(f"{name}.qweight", tensors["qweight"], (in_features, n // 8), label)
        q = unpack_columns(tensors["qweight"], AWQ_ORDER)
        zeros = unpack_columns(tensors["qzeros"], AWQ_ORDER)
        return Int4Weight(q, zeros, scales, None)
    _expect(f"{name}.qweight", tensors["qweight"], (in_features // 8, n), label)
    q = unpack_columns(tensors["qweight"].t().contiguous(), GPTQ_ORDER).t().contiguous()
    zeros = unpack_columns(tensors["qzeros"], GPTQ_ORDER) + quant.zero_offset
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        _expect(f"{name}.g_idx", g_idx, (in_features,), label)
        g_idx = g_idx.to(torch.int32)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"{name}.g_idx: group numbers outside 0..{groups - 1}")
        if torch.equal(g_idx, torch.arange(in_features, dtype=torch.int32) // quant.group_size):
            g_idx = None
    return Int4Weight(q, zeros, scales, g_idx)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of W [K, N] = (q - zeros[k // group]) * scales[k // group]."""
    return {"qweight": pack_columns(q, AWQ_ORDER), "qzeros": pack_columns(zeros, AWQ_ORDER), "scales": scales}


def pack_gptq(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, zero_offset: int
) -> dict[str, torch.Tensor]:
    """AutoGPTQ / GPTQModel tensors of W [K, N] = (q - zeros[g_idx[k]]) * scales[g_idx[k]]; zero_offset 1 writes
    format `gptq` (zeros stored minus one), 0 `gptq_v2`."""
    qweight = pack_columns(q.t().contiguous(), GPTQ_ORDER).t().contiguous()
    qzeros = pack_columns(zeros.to(torch.int64) - zero_offset, GPTQ_ORDER)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}
