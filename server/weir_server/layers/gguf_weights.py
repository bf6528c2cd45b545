"""A run of a weight's output rows in the form its matmul reads, chosen once at load for the device and type.

- `PlanesRows` (CUDA): the blocks relaid as planes (kernels/gguf_planes.py) at about the file's bytes, read by
  the Triton kernel (kernels/gguf_matmul.py).
- `PackedRows` (CPU): raw GGUF blocks (a 4-bit type where the int4 kernel is missing, an embedding): a tile of
  rows at a time is dequantized and multiplied, so memory stays at the file's size plus one tile.
- `Int8BlockRows` (CPU): Q5_0, Q8_0, Q5_K and Q6_K as int8 quants and per-group scales. A bf16 model's rows go
  to the C++ integer-dot op's layout (kernels/cpu/quant_matmul.cpp; Q6_K's scales per 16 in its two-scale
  variant, 1.25 to 1.5 bytes a weight against the file's 0.69 to 1.06); otherwise a tile is dequantized per call.
- `Int4Rows` (CPU): Q4_0, Q4_1 and Q4_K on the int4 grid of groups of 32, w = (q - 8) * scale + zero: Q4_K's
  sub-block of 32 has scale = d * sc and zero = 8 * scale - dmin * m (exact in float32). A bf16 model holds them
  in the C++ op's layout with bf16 scales and zeros (`Int4Weight`), as the dequantized Q4_0/Q4_1 path does;
  a float32 model in torch's int4 layout with float32 ones.
- `DenseRows`: a float weight (F16/F32 tensors, types without a kernel, and tensor-parallel shards that cut
  through a block).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.kernels import HAS_TRITON
from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.kernels.gguf_dequant import (
    INT4_TYPES,
    INT8_TYPES,
    Q4_0,
    Q4_K,
    GGMLType,
    dequantize,
    four_bit_quants,
    int8_grid,
    k_scales_mins,
)
from weir_server.kernels.gguf_matmul import gguf_matmul
from weir_server.kernels.gguf_planes import GGUFPlanes, dequantize_planes, to_planes

logger = logging.getLogger(__name__)

INT4_GROUP = 32
_TILE_WEIGHTS = 1 << 20  # weights dequantized at once on the CPU path (4 MiB in float32)
# Up to this many rows of x the C++ ops read the int8 rows, each row's result the same bits whatever rows share the
# step, so a speculative verify row's logits equal its decode's. SmolLM2's Q8_0 head (49,152 x 576) on this 2-core
# Zen 4, one thread: the integer-dot op (groups of 32) 1.2 ms for 1 row and 2.2 for 4, the fp32 op (any group)
# 2.4 and 4.9, the packed bf16 head 2.8-3.6 and 3.1; from 8 rows oneDNN on a dequantized tile is faster.
INT8_OP_MAX_ROWS = 4
# Up to this many rows a step is bound by reading the weights, and 4-bit copies read 4x less than bf16 ones. With
# the C++ op (about 15 us more per row on a 1728 x 576 weight) 8 rows still beat the bf16 copy: 8 sequences of the
# packaged model decoded at 31-33 ms a step against 37-40 ms with 4 (in process, this 2-core Zen 4).
INT4_MAX_ROWS = 8
# A GGUF projection kept only in the C++ layouts takes the integer-dot op up to this many rows and multiplies
# dequantized tiles beyond. A [3072, 576] weight, 2 threads, this Zen 4: the int4 op 0.53 / 1.09 / 2.11 ms at
# 16 / 32 / 64 rows, dequantized tiles 1.08 / 1.18 / 1.61 ms (oneDNN on a bf16 copy packed at load: 0.19 / 0.28
# / 0.59 ms, the dequantizing load's price for holding 2 bytes a weight).
PACKED_OP_MAX_ROWS = 32


def packed_tiles_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [T, K] times a C++ op layout's weights for a step of many rows: a tile of rows at a time dequantized to
    x's dtype and multiplied by oneDNN, several times faster there than the integer-dot op (built for a few rows)."""
    rows = packed.shape[0] * 8
    out = torch.empty((x.shape[0], rows), dtype=x.dtype, device=x.device)
    step = max(1, _TILE_WEIGHTS // (8 * x.shape[1]))  # blocks of 8 rows per tile
    for start in range(0, packed.shape[0], step):
        tile = cpu_ops().packed_dequantize(packed[start : start + step], x.dtype)  # type: ignore[union-attr]
        out[:, start * 8 : (start + step) * 8] = x @ tile.t()
    return out


class DenseRows(nn.Module):
    """Float rows [rows, cols] in the model's dtype."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.rows = weight.shape[0]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class PackedRows(nn.Module):
    """Raw GGUF blocks [rows, row_bytes] of `qtype` (CPU): tiles dequantized and multiplied."""

    raw: torch.Tensor

    def __init__(self, raw: torch.Tensor, qtype: GGMLType, cols: int) -> None:
        super().__init__()
        self.register_buffer("raw", raw)
        self.qtype, self.rows, self.cols = qtype, raw.shape[0], cols

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.cols)
        out = torch.empty((flat.shape[0], self.rows), dtype=x.dtype, device=x.device)
        step = max(1, _TILE_WEIGHTS // self.cols)
        for start in range(0, self.rows, step):
            tile = dequantize(self.raw[start : start + step], self.qtype).to(x.dtype)
            out[:, start : start + step] = flat @ tile.t()
        return out.reshape(*x.shape[:-1], self.rows)

    def dequantize_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 rows `index` names (an embedding lookup dequantizes only the gathered rows)."""
        return dequantize(self.raw[index], self.qtype)


class PlanesRows(nn.Module):
    """GGUF rows relaid as planes (CUDA), read by the Triton kernel; embedding lookups dequantize the gathered
    rows with device ops only, so a CUDA graph captures them."""

    def __init__(self, planes: GGUFPlanes) -> None:
        super().__init__()
        self.qtype, self.rows, self.cols = planes.qtype, planes.rows, planes.cols
        self.plane_names = tuple(planes.tensors())
        for name, tensor in planes.tensors().items():  # buffers, so that .to() and the memory count see them
            self.register_buffer(name, tensor)

    @property
    def planes(self) -> GGUFPlanes:
        return GGUFPlanes(self.qtype, self.cols, **{name: getattr(self, name) for name in self.plane_names})

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = gguf_matmul(x.reshape(-1, self.cols), self.planes)
        return out.reshape(*x.shape[:-1], self.rows)

    def dequantize_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 rows `index` names."""
        flat = index.reshape(-1)
        return dequantize_planes(self.planes.select(flat)).reshape(*index.shape, self.cols)


def packed_for_device(raw: torch.Tensor, qtype: GGMLType, cols: int) -> PackedRows | PlanesRows:
    """Rows kept in GGUF's bytes for raw's device: planes where the Triton kernel runs, else the raw blocks."""
    if raw.is_cuda and HAS_TRITON:
        return PlanesRows(to_planes(raw, qtype))
    return PackedRows(raw, qtype, cols)


@functools.cache
def int4_available() -> bool:
    """Whether this torch build has the CPU 4-bit weight-only matmul."""
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def int4_grid(raw: torch.Tensor, qtype: GGMLType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0/Q4_1/Q4_K rows -> (q [rows, cols] in 0..15, scale and zero [rows, cols / 32]) with w = (q - 8) * scale
    + zero, the int4 kernel's form."""
    rows = raw.shape[0]
    b = raw.reshape(-1, qtype.type_size)
    d = b[:, :2].contiguous().view(torch.float16).float()
    q = four_bit_quants(raw, qtype)
    if qtype.id == Q4_K.id:
        dmin = b[:, 2:4].contiguous().view(torch.float16).float()
        sc, mn = k_scales_mins(b[:, 4:16])
        scale = d * sc.float()
        zero = 8 * scale - dmin * mn.float()
    else:
        scale = d
        zero = (
            torch.zeros_like(d) if qtype.id == Q4_0.id else b[:, 2:4].contiguous().view(torch.float16).float() + 8 * d
        )
    return q.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


class Int4Weight:
    """A weight on the 4-bit grid (groups of 32 along the input dim: W = (q - 8) * scale + zero), held for one of
    two kernels: Weir's C++ op (kernels/cpu/quant_matmul.cpp: integer dot products, about twice torch's speed at one
    row, the same bits for a row whatever shares its step) where it is built, the output dim is a multiple of 8
    and the scales are bf16 (the op's), else torch's int4 CPU kernel (exact with float32 scales)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """q uint8 [N, K] in 0..15; scales and zeros [N, K / 32] in the weight's dtype."""
        rows, cols = q.shape
        ops = cpu_ops()
        self.packed: torch.Tensor | None = None
        self.torch_pack: tuple[torch.Tensor, torch.Tensor] | None = None
        if ops is not None and rows % 8 == 0 and scales.dtype == torch.bfloat16:
            self.packed = ops.int4_pack(q, scales, zeros)
        else:
            scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8)
            self.torch_pack = (packed, scales_and_zeros)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:
            out = cpu_ops().int4_group_matmul(x, self.packed)  # type: ignore[union-attr]
        else:
            assert self.torch_pack is not None
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.torch_pack[0], INT4_GROUP, self.torch_pack[1])
        return out if bias is None else out + bias

    def silu_and_mul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """silu(gate) * up for a [gate; up] weight; the C++ op does it inside the matmul."""
        if self.packed is not None and bias is None:
            return cpu_ops().int4_group_matmul(x, self.packed, silu_and_mul=True)  # type: ignore[no-any-return,union-attr]
        gate, up = self.matmul(x, bias).chunk(2, dim=-1)
        return F.silu(gate) * up


class Int4Rows(nn.Module):
    """CPU rows on the int4 grid of groups of 32, held for the C++ op or torch's kernel (`Int4Weight`)."""

    def __init__(self, raw: torch.Tensor, qtype: GGMLType, dtype: torch.dtype) -> None:
        super().__init__()
        q, scale, zero = int4_grid(raw, qtype)
        self.qtype, (self.rows, self.cols) = qtype, q.shape
        self.int4 = Int4Weight(q.to(torch.uint8), scale.to(dtype), zero.to(dtype))
        held = (self.int4.packed,) if self.int4.packed is not None else self.int4.torch_pack or ()
        for i, tensor in enumerate(held):  # buffers, so that .to() and the memory count see them
            self.register_buffer(f"int4_{i}", tensor, persistent=False)

    @property
    def packed(self) -> torch.Tensor | None:
        """The C++ op's layout, or None where torch's kernel holds the rows."""
        return self.int4.packed

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.cols).contiguous()
        if self.int4.packed is not None and flat.shape[0] > PACKED_OP_MAX_ROWS:
            return packed_tiles_matmul(flat, self.int4.packed).reshape(*x.shape[:-1], self.rows)
        if self.int4.torch_pack is not None:  # torch's kernel takes x in its scales' dtype
            flat = flat.to(self.int4.torch_pack[1].dtype)
        out = self.int4.matmul(flat, None)
        return out.reshape(*x.shape[:-1], self.rows).to(x.dtype)


def _five_bit_grid(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(u in 0..31, scales, offsets) with u * scale - offset = q * scale - offset (offset 0 where None) for int8
    quants spanning at most 32 values, shifted by their least; None where they span more, or where moving the
    shift into the offsets would round them (it is exact for GGUF's fp16-based scales)."""
    low, high = int(q.min()), int(q.max())
    if high - low > 31:
        return None
    base = torch.zeros_like(scales) if offsets is None else offsets.float()
    moved = low * scales.float()
    shifted = base - moved
    if not torch.equal(shifted + moved, base):
        return None
    return (q.to(torch.int16) - low).to(torch.uint8), scales, shifted


class Int8BlockRows(nn.Module):
    """CPU Q5_0, Q8_0, Q5_K and Q6_K rows as int8 quants with a scale (and for Q5_K an offset) per group of 32 or
    16, in the model's dtype (exact in float32): a tile is dequantized by a convert and a multiply, several times
    faster than parsing the raw blocks. A tied embedding looks its rows up here, so the bytes are held once.
    `pack_for_cpu` adds the C++ op's layout (bf16 models); `drop_plain_rows` then frees the plain one, the op takes
    every step and lookups read the op's layout."""

    qs: torch.Tensor | None
    scales: torch.Tensor | None
    offsets: torch.Tensor | None
    packed: torch.Tensor | None

    def __init__(self, raw: torch.Tensor, qtype: GGMLType, dtype: torch.dtype) -> None:
        super().__init__()
        q, scale, offset = int8_grid(raw, qtype)
        self.qtype, self.rows, (self.groups, self.group) = qtype, raw.shape[0], q.shape[1:]
        self.cols = self.groups * self.group
        self.register_buffer("qs", q.contiguous())
        # float32 (a few % of the int8 bytes): the C++ op forms each weight exactly from them.
        self.register_buffer("scales", scale.float())
        self.register_buffer("offsets", None if offset is None else offset.float())
        self.register_buffer("packed", None)

    def pack_for_cpu(self, dtype: torch.dtype) -> None:
        """Lay the rows out for the C++ integer-dot op (groups of 32, or Q6_K's 16 as two scales a group) where it
        is built and fits: a bf16 model (the op's activations are split into int8 levels, an error far under
        bf16's own rounding), rows a multiple of 8. Quants spanning at most 32 levels (Q5_0, Q5_K) take the 5-bit
        layout (0.875 bytes a weight), others the 8-bit one (1.25)."""
        ops = cpu_ops()
        fits = self.rows % 8 == 0 and self.cols % 32 == 0 and self.group in (16, 32)
        if ops is not None and dtype == torch.bfloat16 and fits and self.qs is not None:
            q, scales, offsets = self.plain_layout()
            five = _five_bit_grid(q, scales, offsets) if self.group == 32 else None
            self.packed = ops.int5_pack(*five) if five is not None else ops.int8_pack(q, scales, offsets)

    def drop_plain_rows(self) -> None:
        """Free the plain int8 rows and their scales once the op's layout holds them (a tied embedding then looks
        its rows up in that layout)."""
        if self.packed is not None:
            self.qs = self.scales = self.offsets = None

    def _tile(self, index: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        assert self.qs is not None and self.scales is not None, "the plain rows were dropped"
        tile = self.qs[index].to(dtype).mul_(self.scales[index].to(dtype))
        if self.offsets is not None:
            tile.sub_(self.offsets[index].to(dtype))
        return tile.view(-1, self.cols)

    def plain_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q [rows, cols], scales and offsets (or None) [rows, groups]: the C++ ops' arguments."""
        assert self.qs is not None and self.scales is not None, "the plain rows were dropped"
        offsets = None if self.offsets is None else self.offsets.view(self.rows, self.groups)
        return self.qs.view(self.rows, self.cols), self.scales.view(self.rows, self.groups), offsets

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.cols)
        few = flat.shape[0] <= (PACKED_OP_MAX_ROWS if self.qs is None else INT4_MAX_ROWS)
        if self.packed is not None and few:
            out = cpu_ops().int8_packed_matmul(flat.contiguous(), self.packed)  # type: ignore[union-attr]
            return out.reshape(*x.shape[:-1], self.rows).to(x.dtype)  # type: ignore[no-any-return]
        if self.packed is not None and self.qs is None:
            return packed_tiles_matmul(flat.contiguous(), self.packed).reshape(*x.shape[:-1], self.rows)
        if flat.shape[0] <= INT8_OP_MAX_ROWS and (ops := cpu_ops()) is not None:
            out = ops.int8_group_matmul(flat, *self.plain_layout())
            return out.reshape(*x.shape[:-1], self.rows).to(x.dtype)
        out = torch.empty((flat.shape[0], self.rows), dtype=x.dtype, device=x.device)
        step = max(1, _TILE_WEIGHTS // self.cols)
        for start in range(0, self.rows, step):
            out[:, start : start + step] = flat @ self._tile(slice(start, start + step), x.dtype).t()
        return out.reshape(*x.shape[:-1], self.rows)

    def dequantize_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` names, in float32 (an embedding lookup). Without the plain rows, the op layout's blocks
        of 8 rows that hold them are dequantized (the same values: q * scale - offset in float32)."""
        if self.qs is not None or self.packed is None:
            return self._tile(index.reshape(-1), torch.float32).reshape(*index.shape, self.cols)
        return op_layout_rows(self.packed, index, self.cols)


# Ids a lookup in an op layout dequantizes at once: each brings its block of 8 rows, so a long prompt's ids at once
# would be a float32 copy of most of the table (SmolLM2's vocabulary: 108 MiB).
_LOOKUP_IDS = 256


def op_layout_rows(packed: torch.Tensor, index: torch.Tensor, cols: int) -> torch.Tensor:
    """The float32 rows `index` names of a C++ op layout (int4_pack, int5_pack, int8_pack: q * scale - offset, the
    file's values): the blocks of 8 rows holding them are dequantized, _LOOKUP_IDS ids at a time."""
    flat = index.reshape(-1)
    out = torch.empty((len(flat), cols), dtype=torch.float32)
    for start in range(0, len(flat), _LOOKUP_IDS):
        ids = flat[start : start + _LOOKUP_IDS]
        blocks, within = ids.div(8, rounding_mode="floor"), ids.remainder(8)
        unique, which = torch.unique(blocks, return_inverse=True)
        tiles = cpu_ops().packed_dequantize(packed[unique], torch.float32)  # type: ignore[union-attr]
        out[start : start + len(ids)] = tiles.view(len(unique), 8, cols)[which, within]
    return out.view(*index.shape, cols)


RowsForm = DenseRows | PackedRows | PlanesRows | Int4Rows | Int8BlockRows


def rows_for_device(raw: torch.Tensor, qtype: GGMLType, cols: int, dtype: torch.dtype) -> RowsForm:
    """The form packed rows take on raw's device: on a CPU Int4Rows for the 4-bit types and Int8BlockRows for
    Q5_0, Q8_0, Q5_K and Q6_K; on CUDA PlanesRows (the Triton kernel reads them) or, without Triton, the
    dequantized rows."""
    if raw.device.type != "cpu":
        if HAS_TRITON:
            return PlanesRows(to_planes(raw, qtype))
        logger.info("no GGUF kernel on %s: dequantizing a %s [%d, %d] weight", raw.device, qtype.name, len(raw), cols)
        return DenseRows(dequantize(raw, qtype).to(dtype))
    if qtype.id in INT8_TYPES:
        rows = Int8BlockRows(raw, qtype, dtype)
        rows.pack_for_cpu(dtype)
        return rows
    if qtype.id in INT4_TYPES and int4_available():
        try:
            return Int4Rows(raw, qtype, dtype)
        except RuntimeError as error:  # a shape the 4-bit kernel does not take
            logger.info(
                "no int4 repack of a %s [%d, %d] weight (%s); dequantizing tiles", qtype.name, len(raw), cols, error
            )
    return PackedRows(raw, qtype, cols)
