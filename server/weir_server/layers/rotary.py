"""Rotary position embeddings (RoPE, rotate-half layout) with the scalings Llama-family configs use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weir_server.kernels import HAS_TRITON
from weir_server.kernels.cache_ops import rotary_and_cache


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for a step's positions once; every layer then rotates its q and k with them."""

    def __init__(
        self, head_dim: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0, max_positions: int = 2048
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = inv_freq.numel() * 2
        self.attention_scaling = attention_scaling
        self.max_positions = max_positions
        # A plain attribute, not a buffer: models are built on the meta device and materialized empty,
        # which would wipe a buffer; this stays a real fp32 tensor whatever dtype the model takes.
        self._inv_freq = inv_freq.detach().to("cpu", torch.float32)
        self._cos_sin_cache: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, rotary_dim / 2] in `dtype`, computed in fp32."""
        freqs = self._freqs(positions.float()).unsqueeze(1)
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos, sin

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> StepRope:
        """This step's rotary inputs: a position-indexed table for the fused CUDA kernel, else cos/sin."""
        if positions.is_cuda and HAS_TRITON:
            return StepRope(positions=positions, cos_sin_cache=self.cos_sin_cache(positions.device))
        cos, sin = self(positions, dtype)
        return StepRope(positions=positions, cos=cos, sin=sin)

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        """[max_positions, rotary_dim] fp32: cos in the first half of a row, sin in the second (built once)."""
        if self._cos_sin_cache is None or self._cos_sin_cache.device != device:
            positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            freqs = self._freqs(positions)
            table = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling
            self._cos_sin_cache = table.contiguous()
        return self._cos_sin_cache

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, scaling={self.attention_scaling}"

    def _freqs(self, positions: torch.Tensor) -> torch.Tensor:
        """fp32 positions [T] -> rotation angles [T, rotary_dim / 2]."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        return positions.unsqueeze(-1) * self._inv_freq


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3, Phi-4-mini): each frequency divided by a factor, the short factors at positions below
    the pretraining length and the long factors from it on.

    transformers re-rotates the whole sequence with the long factors once it outgrows the pretraining length;
    a KV cache cannot re-rotate keys it already holds, so the choice is made per position (as a key's rotation
    must depend on its position alone). Up to the pretraining length both agree exactly.
    """

    def __init__(
        self,
        head_dim: int,
        short_inv_freq: torch.Tensor,
        long_inv_freq: torch.Tensor,
        original_max_positions: int,
        attention_scaling: float,
        max_positions: int,
    ) -> None:
        super().__init__(head_dim, short_inv_freq, attention_scaling, max_positions)
        self.original_max_positions = original_max_positions
        self._long_inv_freq = long_inv_freq.detach().to("cpu", torch.float32)

    def _freqs(self, positions: torch.Tensor) -> torch.Tensor:
        short = super()._freqs(positions)
        if self._long_inv_freq.device != positions.device:
            self._long_inv_freq = self._long_inv_freq.to(positions.device)
        long = positions.unsqueeze(-1) * self._long_inv_freq
        return torch.where((positions >= self.original_max_positions).unsqueeze(-1), long, short)


@dataclass
class StepRope:
    """One step's rotary inputs, computed once and shared by every layer."""

    positions: torch.Tensor  # [T]
    cos: torch.Tensor | None = None  # [T, 1, rotary_dim / 2] (torch path)
    sin: torch.Tensor | None = None
    cos_sin_cache: torch.Tensor | None = None  # [max_positions, rotary_dim] fp32 (fused CUDA path)
    # Torch path: cos/sin widened once per step to [T, 1, rotary_dim] for every layer's `rotate`.
    _wide: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def fused(self) -> bool:
        return self.cos_sin_cache is not None

    def rotate_and_cache(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Fused path only: rotate q [T, H, D] and k [T, Hkv, D] in place and write k, v at their cache slots."""
        assert self.cos_sin_cache is not None
        rotary_and_cache(q, k, v, self.positions, self.cos_sin_cache, kv_cache, slot_mapping)

    def flat_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch path: cos and sin as contiguous [T, rotary_dim / 2] (what the CPU decode op reads)."""
        assert self.cos is not None and self.sin is not None
        if self._flat is None:
            half = self.cos.shape[-1]
            self._flat = (self.cos.reshape(-1, half).contiguous(), self.sin.reshape(-1, half).contiguous())
        return self._flat

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch path: rotated copies of q and k."""
        assert self.cos is not None and self.sin is not None
        if self._wide is None:
            self._wide = (torch.cat((self.cos, self.cos), dim=-1), torch.cat((-self.sin, self.sin), dim=-1))
        joined = _joined_heads(q, k)
        if joined is not None:  # q and k side by side in one fused projection's rows: one pass rotates both
            rotated = _apply_rotary_wide(joined, *self._wide)
            return rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]
        return _apply_rotary_wide(q, *self._wide), _apply_rotary_wide(k, *self._wide)


def _joined_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """[T, Hq + Hk, D] over q [T, Hq, D] and k [T, Hk, D] where k's heads follow q's in the same rows (views of
    a fused q/k/v projection's output), else None."""
    if q.dim() != 3 or q.dtype != k.dtype or q.device != k.device:
        return None
    if q.stride(0) != k.stride(0) and q.shape[0] > 1:  # a single row's stride is arbitrary
        return None
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size():
        return None
    if q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, D]: pairs are (i, i + rotary_dim / 2); features past rotary_dim pass."""
    half = cos.shape[-1]
    x1, x2, passthrough = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, passthrough), dim=-1)


def _apply_rotary_wide(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` in three ops: x * [cos | cos] + [x2 | x1] * [-sin | sin] over the rotary features."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    swapped = torch.cat((x[..., half:rotary_dim], x[..., :half]), dim=-1)
    rotated = torch.addcmul(x[..., :rotary_dim] * cos, swapped, signed_sin)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE settings as one flat dict with `rope_type` and `rope_theta`.

    transformers 5 exposes `config.rope_parameters`; older configs carry `rope_theta` plus `rope_scaling`.
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def get_rope(config: Any, head_dim: int) -> RotaryEmbedding:
    """Build the rotary embedding a transformers config describes (default, linear, dynamic, llama3, yarn,
    longrope); `partial_rotary_factor` turns only the first part of each head."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim))
    scaling = 1.0
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    elif rope_type == "dynamic":
        # Dynamic NTK only changes the frequencies past max_position_embeddings, and Weir never serves
        # more than that (max_model_len is capped by it), so within our range it is plain RoPE.
        pass
    elif rope_type == "yarn":
        inv_freq, scaling = _transformers_inv_freq(config, rope_type)
    elif rope_type == "longrope":
        return _longrope(config, params, head_dim, inv_freq)
    else:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: default, linear, dynamic, llama3, yarn, longrope"
        )
    max_positions = int(getattr(config, "max_position_embeddings", None) or 2048)
    return RotaryEmbedding(head_dim, inv_freq, scaling, max_positions)


def _longrope(config: Any, params: dict[str, Any], head_dim: int, inv_freq: torch.Tensor) -> LongRopeRotaryEmbedding:
    """LongRoPE from `short_factor`, `long_factor`, `original_max_position_embeddings` and the attention factor
    (given, or derived from the context extension as transformers does)."""
    max_positions = int(getattr(config, "max_position_embeddings", None) or 2048)
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    if original is None:
        raise ValueError("rope_type 'longrope' needs original_max_position_embeddings")
    original = int(original)
    factors = {}
    for key in ("short_factor", "long_factor"):
        factor = torch.tensor(params[key], dtype=torch.float32, device="cpu")  # models are built on meta
        if factor.shape != inv_freq.shape:
            raise ValueError(f"rope {key} has {factor.numel()} entries; the rotary dims need {inv_freq.numel()}")
        factors[key] = factor
    scaling = params.get("attention_factor")
    if scaling is None:
        extension = params.get("factor") or max_positions / original
        scaling = 1.0 if extension <= 1.0 else math.sqrt(1 + math.log(extension) / math.log(original))
    return LongRopeRotaryEmbedding(
        head_dim,
        inv_freq / factors["short_factor"],
        inv_freq / factors["long_factor"],
        original,
        float(scaling),
        max_positions,
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _transformers_inv_freq(config: Any, rope_type: str) -> tuple[torch.Tensor, float]:
    """Frequencies from transformers' own RoPE initializers, for the rarer scalings we do not re-derive."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)
