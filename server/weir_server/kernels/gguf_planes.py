"""GGUF rows relaid as planes for the GPU: quants in one contiguous array, each level of scales in its own.

A GGUF row interleaves 2-byte scales with its quants in blocks of 18 to 210 bytes, so a kernel reading the file's
layout loads one byte at a time. Relaid once at load, a tile of quants is one wide load and its scales a few
small ones, in about the file's bytes:

- `q`: 4-bit types (Q4_0, Q4_1, Q4_K) as uint8 [N, K / 2], byte i holding weights 2i (low nibble) and 2i + 1;
  the others (Q5_0, Q8_0, Q5_K, Q6_K) as int8 [N, K], already shifted (Q5_0 q - 16, Q6_K q - 32).
- `d` float16 [N, K / super]: the block scale (super = 32 for the plain types, 256 for the K types).
- `sub` int8 [N, K / group] (K types): the 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K, groups of 16) sub-block scales.
- `dmin` float16 [N, K / super] and `mins` int8 [N, K / group]: the offset (Q4_1: -m; K types: dmin, m).

Every weight is then w = (d * sub) * q - (dmin * mins), with a missing plane read as 1 and Q4_0's offset as 8 * d:
the same float32 operations, in the same order, as `gguf_dequant.dequantize`, so `dequantize_planes` equals it
bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weir_server.kernels.gguf_dequant import (
    INT4_TYPES,
    Q4_0,
    Q4_1,
    Q5_K,
    Q6_K,
    GGMLType,
    four_bit_quants,
    int8_grid,
    k_scales_mins,
)


@dataclass(frozen=True)
class GGUFPlanes:
    """One weight [rows, cols] of `qtype` as planes (see the module docstring)."""

    qtype: GGMLType
    cols: int
    q: torch.Tensor
    d: torch.Tensor
    sub: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def four_bit(self) -> bool:
        return self.qtype.id in INT4_TYPES

    @property
    def group(self) -> int:
        """Weights per entry of `sub` and `mins` (per entry of `d` where there is no `sub`)."""
        return 16 if self.qtype.id == Q6_K.id else 32

    @property
    def super_block(self) -> int:
        """Weights per entry of `d` and `dmin`."""
        return self.qtype.block_size

    def tensors(self) -> dict[str, torch.Tensor]:
        """The planes held, by name (buffers of the module that owns them)."""
        named = {"q": self.q, "d": self.d, "sub": self.sub, "dmin": self.dmin, "mins": self.mins}
        return {name: t for name, t in named.items() if t is not None}

    def select(self, index: torch.Tensor | slice) -> GGUFPlanes:
        """The planes of the rows `index` names."""
        return GGUFPlanes(
            self.qtype,
            self.cols,
            **{name: t[index] for name, t in self.tensors().items()},  # type: ignore[arg-type]
        )


def _f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16)


def to_planes(raw: torch.Tensor, qtype: GGMLType) -> GGUFPlanes:
    """Raw GGUF rows [rows, row_bytes] (uint8, on any device) -> their planes on the same device."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, qtype.type_size)
    cols = raw.shape[1] // qtype.type_size * qtype.block_size

    def plane(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(rows, -1).contiguous()

    def k_scales() -> dict[str, torch.Tensor]:  # Q4_K, Q5_K: 6-bit sub-block scales and mins under d and dmin
        sc, mn = k_scales_mins(blocks[:, 4:16])
        return dict(sub=plane(sc.to(torch.int8)), dmin=plane(_f16(blocks[:, 2:4])), mins=plane(mn.to(torch.int8)))

    d = plane(_f16(blocks[:, :2]))
    if qtype.id in INT4_TYPES:
        q = four_bit_quants(raw, qtype)
        packed = plane(q[:, 0::2] | (q[:, 1::2] << 4))
        if qtype.id == Q4_0.id:
            return GGUFPlanes(qtype, cols, packed, d)
        if qtype.id == Q4_1.id:
            return GGUFPlanes(qtype, cols, packed, d, dmin=plane(-_f16(blocks[:, 2:4])))
        return GGUFPlanes(qtype, cols, packed, d, **k_scales())
    q8 = plane(int8_grid(raw, qtype)[0])
    if qtype.id == Q5_K.id:
        return GGUFPlanes(qtype, cols, q8, d, **k_scales())
    if qtype.id == Q6_K.id:
        sub = plane(blocks[:, 192:208]).view(torch.int8)
        return GGUFPlanes(qtype, cols, q8, plane(_f16(blocks[:, 208:210])), sub=sub)
    return GGUFPlanes(qtype, cols, q8, d)  # Q8_0, Q5_0


def unpack_quants(planes: GGUFPlanes) -> torch.Tensor:
    """The quants [rows, cols] as float32 (4-bit ones 0..15, the rest signed as stored)."""
    q = planes.q
    if planes.four_bit:
        q = torch.stack((q & 0x0F, q >> 4), dim=-1).reshape(planes.rows, planes.cols)
    return q.float()


def dequantize_planes(planes: GGUFPlanes) -> torch.Tensor:
    """float32 [rows, cols], equal bit for bit to `gguf_dequant.dequantize` of the raw rows (no host tensors are
    made, so a CUDA graph captures it: a GGUF embedding looks its rows up with it)."""
    rows, group = planes.rows, planes.group
    q = unpack_quants(planes).view(rows, -1, group)
    per_group = planes.super_block // group  # groups per entry of d and dmin

    def spread(t: torch.Tensor) -> torch.Tensor:  # [rows, supers] -> [rows, groups, 1]
        return t.float().unsqueeze(-1).expand(-1, -1, per_group).reshape(rows, -1, 1)

    scale = spread(planes.d)
    if planes.sub is not None:
        scale = scale * planes.sub.float().unsqueeze(-1)
    w = scale * q
    if planes.qtype.id == Q4_0.id:
        w = w - scale * 8
    elif planes.dmin is not None:
        offset = spread(planes.dmin)
        if planes.mins is not None:
            offset = offset * planes.mins.float().unsqueeze(-1)
        w = w - offset
    return w.reshape(rows, planes.cols)
