"""Linear layers over AWQ / GPTQ 4-bit weights, kept packed in memory.

`quantize_int4_layers` swaps a model's tensor-parallel linear layers (still on the meta device) for `Int4Linear`
before its weights load. A projection's qweight, qzeros, scales (and g_idx) arrive one by one; once all are in,
they are unpacked (layers/int4_checkpoint.py) and this rank's part is cut:
- column-parallel (fused q/k/v, gate/up included): whole output columns, found by running the replaced layer's own
  `weight_loader` on a column of row numbers (`checkpoint_rows`), so the sharding rules live in layers/linear.py;
- row-parallel: input rows, whole groups each; under act-order (g_idx) the rank keeps its rows, their g_idx and
  every group's scales and zeros, as vLLM does.
Act-order rows are then sorted by group (the activations' columns are permuted to match each call), which makes
an unsharded weight's groups contiguous again; only a sharded act-order weight keeps a g_idx for the kernel.

The form a matmul reads is chosen once: on CUDA the Triton kernel over the packed weight (kernels/int4_matmul.py);
on a CPU torch's int4 weight-only matmul (`_weight_int4pack_mm_for_cpu`, the GGUF Q4 path's) where the groups are
contiguous, else a tile dequantized per call.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from weir_server.distributed.communication import all_reduce
from weir_server.kernels import HAS_TRITON
from weir_server.kernels.int4_matmul import dequantize_int4, int4_matmul, pack_rows
from weir_server.layers.gguf_weights import int4_available
from weir_server.layers.int4_checkpoint import Int4Weight, read_int4
from weir_server.layers.linear import (
    RowParallelLinear,
    WeightSource,
    read_full,
    swap_linear_layers,
)
from weir_server.models.quant_config import QuantConfig

_TILE_WEIGHTS = 1 << 20  # weights dequantized at once on the CPU fallback


def checkpoint_rows(base: Any, out_features: int, rows: int, name: str, shard_id: Any) -> tuple[int, torch.Tensor]:
    """(first local output row, the checkpoint row of each local row from there) of a column-parallel layer's
    shard `shard_id`, learned by running `base.weight_loader` on row numbers."""
    probe = torch.full((out_features, 1), -1.0, dtype=torch.float64)
    numbers = torch.arange(1, rows + 1, dtype=torch.float64).unsqueeze(1)
    base.weight_loader(probe, numbers, name, shard_id)
    filled = (probe[:, 0] != -1).nonzero()[:, 0]
    offset = int(filled[0])
    if not torch.equal(filled, torch.arange(offset, offset + len(filled))):
        raise ValueError(f"{name}: this rank's rows are not one run")
    return offset, probe[filled, 0].long() - 1


class Int4Linear(nn.Module):
    """A column-parallel (incl. fused q/k/v, gate/up) or row-parallel layer over AWQ / GPTQ weights."""

    _base: Any

    def __init__(self, base: Any, quant: QuantConfig) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)  # not a submodule: its meta weight is never allocated
        self.quant, self.group_size = quant, quant.group_size
        self.tp_rank, self.tp_size = base.tp_rank, base.tp_size
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.out_features, self.in_features = base.out_features, base.in_features
        self.full_in = int(getattr(base, "full_input_size", base.in_features))
        self.kinds = (
            ("qweight", "qzeros", "scales", "g_idx") if quant.method == "gptq" else ("qweight", "qzeros", "scales")
        )
        for kind in self.kinds:  # placeholders under the checkpoint's names; the model's dtype and device ride on them
            setattr(self, kind, nn.Parameter(torch.empty(0), requires_grad=False))
        self.bias = getattr(base, "bias", None)
        self._arrived: dict[Any, dict[str, torch.Tensor]] = {}
        self._parts: dict[int, Int4Weight] = {}
        self.form: nn.Module | None = None
        self.perm: torch.Tensor | None
        self.register_buffer("perm", None)  # act-order: the input column each sorted row reads

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Take one checkpoint tensor of a projection; cut and pack this rank's part once all of its have arrived."""
        kind = name.rpartition(".")[2]
        if kind not in self.kinds:
            self._base.weight_loader(param, src, name, shard_id)  # the bias
            return
        arrived = self._arrived.setdefault(shard_id, {})
        arrived[kind] = read_full(src)
        if len(arrived) < len(self.kinds):
            return
        del self._arrived[shard_id]
        prefix = name.rpartition(".")[0]
        weight = read_int4(arrived, self.quant, self.full_in, prefix)
        if self.row_parallel:
            if weight.scales.shape[1] != self.out_features:
                raise ValueError(f"{prefix}: {weight.scales.shape[1]} output features, expected {self.out_features}")
            self._parts[0] = self._input_shard(weight, prefix)
        else:
            offset, index = checkpoint_rows(self._base, self.out_features, weight.scales.shape[1], name, shard_id)
            self._parts[offset] = Int4Weight(
                weight.q[:, index], weight.zeros[:, index], weight.scales[:, index], weight.g_idx
            )
        if sum(part.q.shape[1] for part in self._parts.values()) == self.out_features:
            self._finalize([self._parts[offset] for offset in sorted(self._parts)], prefix)
            self._parts = {}

    def _input_shard(self, weight: Int4Weight, name: str) -> Int4Weight:
        start, length = self.tp_rank * self.in_features, self.in_features
        if self.tp_size == 1:
            return weight
        if weight.g_idx is not None:  # act-order: this rank's rows, every group's scales and zeros
            return Int4Weight(
                weight.q[start : start + length], weight.zeros, weight.scales, weight.g_idx[start : start + length]
            )
        if start % self.group_size or length % self.group_size:
            raise ValueError(
                f"{name}: {length} input features per rank cut through groups of {self.group_size}; "
                "choose a tensor-parallel size that keeps whole groups"
            )
        groups = slice(start // self.group_size, (start + length) // self.group_size)
        return Int4Weight(weight.q[start : start + length], weight.zeros[groups], weight.scales[groups], None)

    def _finalize(self, parts: list[Int4Weight], name: str) -> None:
        placeholder = cast(torch.Tensor, self.qweight)
        device, dtype = placeholder.device, placeholder.dtype
        g_idx = parts[0].g_idx
        if any(not _same_order(p.g_idx, g_idx) for p in parts):
            raise ValueError(f"{name}: the fused projections' g_idx differ; Weir needs one act-order per input")
        q = torch.cat([p.q for p in parts], dim=1)
        zeros = torch.cat([p.zeros for p in parts], dim=1)
        scales = torch.cat([p.scales for p in parts], dim=1)
        if g_idx is not None:  # sort the rows by group; the activations' columns follow at each call
            perm = torch.argsort(g_idx, stable=True)
            q, g_idx = q[perm], g_idx[perm]
            contiguous = len(zeros) * self.group_size == len(q)
            if contiguous and torch.equal(g_idx, torch.arange(len(q), dtype=torch.int32) // self.group_size):
                g_idx = None
            self.perm = perm.to(device)
        self.form = _form(q, zeros, scales, g_idx, self.group_size, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form is None:
            raise RuntimeError(f"{type(self).__name__}: weights not loaded")
        if self.perm is not None:
            x = x[..., self.perm]
        out = self.form(x)
        if self.row_parallel and self.tp_size > 1:
            out = all_reduce(out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.quant.method}, in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, act_order={self.perm is not None}, form={type(self.form).__name__}"
        )


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


class PackedInt4(nn.Module):
    """The packed weight (kernels/int4_matmul.py's form): the Triton kernel on CUDA, tiles dequantized on a CPU."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None

    def __init__(
        self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None, group_size: int
    ) -> None:
        super().__init__()
        self.register_buffer("qweight", pack_rows(q))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros.to(scales.dtype))  # small integers: exact in every float dtype
        self.register_buffer("g_idx", g_idx)
        self.group_size = group_size
        self.in_features, self.out_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.is_cuda and HAS_TRITON:
            out = int4_matmul(flat, self.qweight, self.scales, self.zeros, self.group_size, self.g_idx)
        else:
            out = torch.empty((flat.shape[0], self.out_features), dtype=x.dtype, device=x.device)
            step = max(8, _TILE_WEIGHTS // self.in_features // 8 * 8)
            for start in range(0, self.out_features, step):
                cols = slice(start, start + step)
                tile = dequantize_int4(
                    self.qweight[:, cols], self.scales[:, cols], self.zeros[:, cols], self.group_size, self.g_idx
                )
                out[:, cols] = flat @ tile.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


class CpuInt4(nn.Module):
    """Contiguous groups in torch's CPU int4 layout: W = (q - 8) * scale + (8 - zero) * scale."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape
        self.group_size = group_size
        offset = (8 - zeros.float()) * scales.float()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous().to(torch.int32), 8)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack((scales.float(), offset), dim=-1).to(scales.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _form(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    scales = scales.to(dtype)
    if device.type == "cpu" and g_idx is None and int4_available():
        try:
            return CpuInt4(q, zeros, scales, group_size)
        except RuntimeError:  # a shape the CPU int4 kernel does not take: the tile path below
            pass
    return PackedInt4(q, zeros, scales, g_idx, group_size).to(device)


def quantize_int4_layers(model: nn.Module, quant: QuantConfig) -> int:
    """Swap the model's tensor-parallel linear layers (exactly those classes) for Int4Linear before
    materializing; the embedding and LM head stay float, as AWQ and GPTQ leave them. Returns how many."""
    return swap_linear_layers(model, lambda layer: Int4Linear(layer, quant))
