"""y = x W^T with W in float8 e4m3 and one scale per output channel, through `torch._scaled_mm` (Hopper's FP8
tensor cores): each call scales the activations per token (dynamic scaling, vLLM's default), so both operands
cross memory and the tensor cores in 8 bits and the product comes back in bf16.

The reference is `fp8_matmul_reference`: the same activation quantization, then a float32 matmul of the
dequantized operands.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]) with x ~ q * scale, each row's largest value at FP8_MAX."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_SCALE) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale  # _scaled_mm: row-major


@functools.cache
def scaled_mm_available(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs FP8 with row-wise scales on this device (CUDA compute capability 8.9 or
    newer, and a torch build that has it there): tried once on a small product."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        weight = torch.ones((16, 16), device=device).to(FP8)
        fp8_matmul(torch.ones((1, 16), device=device, dtype=torch.bfloat16), weight, torch.ones(16, device=device))
    except RuntimeError as error:
        logger.info("torch._scaled_mm with row-wise scales does not run on %s: %s", device, error)
        return False
    return True


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] e4m3 * weight_scale [N] float32)^T -> [M, N] in x's dtype."""
    x8, x_scale = quantize_per_row(x)
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16)
    return out if x.dtype == torch.bfloat16 else out.to(x.dtype)


def fp8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """What `fp8_matmul` computes, in float32 from the same 8-bit operands."""
    x8, x_scale = quantize_per_row(x)
    w = weight.float() * weight_scale.float().view(-1, 1)
    return ((x8.float() * x_scale) @ w.t()).to(x.dtype)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (e4m3 [N, K], float32 scale [N]): `--quantization fp8` on load."""
    q, scale = quantize_per_row(weight)
    return q, scale.view(-1)
