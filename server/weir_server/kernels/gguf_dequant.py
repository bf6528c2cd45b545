"""GGUF block formats Weir keeps packed, and their plain-torch dequantizers (the reference for every kernel).

A GGUF matrix [rows, cols] is stored row by row, each row a run of blocks along the input dimension; a block
holds `block_size` weights in `type_size` bytes. Each dequantizer takes raw bytes [..., n_blocks * type_size]
(uint8) and returns float32 [..., n_blocks * block_size], computing in the same order as the `gguf` package's
numpy code, so the two agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GGMLType:
    """One GGML quantization type: its id in the file, its name, and its block geometry."""

    id: int
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block

    def __str__(self) -> str:
        return self.name


Q4_0 = GGMLType(2, "Q4_0", 32, 18)
Q4_1 = GGMLType(3, "Q4_1", 32, 20)
Q5_0 = GGMLType(6, "Q5_0", 32, 22)
Q8_0 = GGMLType(8, "Q8_0", 32, 34)
Q4_K = GGMLType(12, "Q4_K", 256, 144)
Q5_K = GGMLType(13, "Q5_K", 256, 176)
Q6_K = GGMLType(14, "Q6_K", 256, 210)

# The types of llama.cpp's Q4_0/Q4_1/Q8_0 and Q4_K_M files; everything else is dequantized at load. Q5_0 is what
# llama-quantize writes for Q4_K (and Q5_1... for Q5_K) where a row's length is no multiple of 256 (SmolLM2's 576).
PACKED_TYPES: dict[int, GGMLType] = {t.id: t for t in (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)}


def row_bytes(qtype: GGMLType, cols: int) -> int:
    """Bytes of one row of `cols` weights."""
    return cols // qtype.block_size * qtype.type_size


def _blocks(raw: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    return raw.reshape(-1, qtype.type_size)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields [n, 2] (uint8) -> float32 [n, 1]."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: the k low nibbles, then the k high nibbles (GGML's order within a run)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return d * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


# Int8 grids: w = scale * q (- offset), q [n, groups, group] int8, scale and offset [n, groups, 1] float32.
Int8Grid = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _q8_0_grid(b: torch.Tensor) -> Int8Grid:
    return b[:, 2:].contiguous().view(torch.int8).unsqueeze(1), _f16(b[:, :2]).unsqueeze(1), None


def _q5_0_grid(b: torch.Tensor) -> Int8Grid:
    """d, then 32 high bits (bit i for weight i), then 16 bytes of low nibbles: w = d * (q - 16)."""
    high = (b[:, 2:6].contiguous().view(torch.int32) >> torch.arange(32, device=b.device)) & 1
    q = (_nibbles(b[:, 6:]).to(torch.int32) | (high << 4)) - 16
    return q.to(torch.int8).unsqueeze(1), _f16(b[:, :2]).unsqueeze(1), None


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q, scale, _ = _q5_0_grid(b)
    return (scale * q.float()).reshape(-1, 32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    q, scale, _ = _q8_0_grid(b)
    return (scale * q.float()).reshape(-1, 32)


def k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit sub-block scales and mins [n, 8] of Q4_K/Q5_K blocks from their 12 packed bytes [n, 12]."""
    s = scales.to(torch.int32)
    d, m, md = s[:, :4], s[:, 4:8], s[:, 8:]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_scaled(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * sc * q - dmin * m over 8 sub-blocks of 32, for Q4_K/Q5_K quants q [n, 8, 32]."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scales_mins(b[:, 4:16])
    scale = (d * sc.float()).unsqueeze(-1)
    offset = (dmin * mn.float()).unsqueeze(-1)
    return (scale * q.float() - offset).reshape(-1, 256)


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [n, 8, 32]: sub-block 2c is the low nibbles of bytes 32c..32c+31, 2c+1 their high ones."""
    runs = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return (runs & 0x0F).reshape(-1, 8, 32)


INT4_TYPES = (Q4_0.id, Q4_1.id, Q4_K.id)  # what `four_bit_quants` takes


def four_bit_quants(raw: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """Q4_0/Q4_1/Q4_K rows [rows, row_bytes] -> their quants [rows, cols] (uint8, 0..15) in the weights' order."""
    b = _blocks(raw, qtype)
    q = _k_low_nibbles(b[:, 16:144]) if qtype.id == Q4_K.id else _nibbles(b[:, 2 if qtype.id == Q4_0.id else 4 :])
    return q.reshape(raw.shape[0], -1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_scaled(b, _k_low_nibbles(b[:, 16:144]))


def _q5_k_grid(b: torch.Tensor) -> Int8Grid:
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
    q = _k_low_nibbles(b[:, 48:176]) | (high << 4)
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scales_mins(b[:, 4:16])
    return q.to(torch.int8), (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    q, scale, offset = _q5_k_grid(b)
    assert offset is not None
    return (scale * q.float() - offset).reshape(-1, 256)


def _q6_k_grid(b: torch.Tensor) -> Int8Grid:
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).unsqueeze(-1)  # [n, 16, 1]
    low_shifts = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1)
    high_shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    low = ((ql.reshape(-1, 2, 1, 64) >> low_shifts) & 0x0F).reshape(-1, 8, 32)
    high = ((qh.reshape(-1, 2, 1, 32) >> high_shifts) & 0x03).reshape(-1, 8, 32)
    return ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16), d, None


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    q, scale, _ = _q6_k_grid(b)
    return (scale * q.float()).reshape(-1, 256)


_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q4_0.id: _q4_0,
    Q4_1.id: _q4_1,
    Q5_0.id: _q5_0,
    Q8_0.id: _q8_0,
    Q4_K.id: _q4_k,
    Q5_K.id: _q5_k,
    Q6_K.id: _q6_k,
}


def dequantize(raw: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """Raw GGUF bytes [..., n_blocks * type_size] -> float32 weights [..., n_blocks * block_size]."""
    lead, nbytes = raw.shape[:-1], raw.shape[-1]
    if nbytes % qtype.type_size:
        raise ValueError(f"{qtype.name}: {nbytes} bytes per row is not a whole number of blocks")
    values = _DEQUANTIZERS[qtype.id](_blocks(raw, qtype))
    return values.reshape(*lead, nbytes // qtype.type_size * qtype.block_size)


_INT8_GRIDS: dict[int, Callable[[torch.Tensor], Int8Grid]] = {
    Q5_0.id: _q5_0_grid,
    Q8_0.id: _q8_0_grid,
    Q5_K.id: _q5_k_grid,
    Q6_K.id: _q6_k_grid,
}
INT8_TYPES = tuple(_INT8_GRIDS)


def int8_grid(raw: torch.Tensor, qtype: GGMLType) -> Int8Grid:
    """Q5_0/Q8_0/Q5_K/Q6_K rows [rows, row_bytes] -> (q [rows, groups, group] int8, scale, offset or None [rows,
    groups, 1] float32) with w = scale * q - offset: the same numbers as `dequantize`, unpacked to bytes."""
    rows = raw.shape[0]
    q, scale, offset = _INT8_GRIDS[qtype.id](_blocks(raw, qtype))
    groups = raw.shape[1] // qtype.type_size * q.shape[1]
    return (
        q.reshape(rows, groups, -1),
        scale.reshape(rows, groups, 1),
        None if offset is None else offset.reshape(rows, groups, 1),
    )
