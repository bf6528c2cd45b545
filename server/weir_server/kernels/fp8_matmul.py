"""y = x W^T with W in float8 e4m3 and one scale per output channel, through `torch._scaled_mm` (Hopper's FP8
tensor cores): each call scales the activations per token (dynamic scaling, vLLM's default), so both operands
cross memory and the tensor cores in 8 bits and the product comes back in bf16.

The reference is `fp8_matmul_reference`: the same activation quantization, then a float32 matmul of the
dequantized operands. On CUDA the activations are quantized by one Triton kernel (`quantize_per_row_kernel`),
once it has given torch's bits on the device: in torch it took eight launches and float32 copies of x per layer,
and FP8 decode measured slower than bf16 (the Llama-3.2-1B shape at batch 1: 2.43 against 1.33 ms a step on an
H100, before the kernel).
"""

from __future__ import annotations

import functools
import logging

import torch

from weir_server.kernels import HAS_TRITON, next_power_of_2, tl, triton

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12
_INV_FP8_MAX = float(torch.tensor(1.0) / torch.tensor(FP8_MAX))  # in float32, as a float32 kernel argument holds it


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]) with x ~ q * scale, each row's largest value at FP8_MAX."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and row_kernel_agrees(x.device):
        return quantize_per_row_kernel(x)
    return _quantize_per_row_torch(x)


def _quantize_per_row_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Times the float32 reciprocal, not divided by FP8_MAX: what torch does on CUDA anyway for a Python divisor,
    # spelled out so the CPU path and the kernel give the same scale's bits.
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_SCALE) * _INV_FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale  # _scaled_mm: row-major


@functools.cache
def row_kernel_agrees(device: torch.device) -> bool:
    """Whether the Triton row quantization gives the torch path's bits on this device: checked once, on rows with
    values near every power of two and zeros, the first time an FP8 layer quantizes (the load's `_scaled_mm`
    probe, before any CUDA graph is captured); elsewhere, or on any difference, the torch path runs."""
    if not HAS_TRITON:
        return False
    grid = (
        torch.linspace(-1, 1, 4096, device=device).view(4, -1)
        * torch.tensor([1e-3, 1.0, 37.0, 3e4], device=device)[:, None]
    )
    x = torch.cat((grid, torch.zeros(1, 1024, device=device))).to(torch.bfloat16)
    try:
        got, want = quantize_per_row_kernel(x), _quantize_per_row_torch(x)
    except Exception as error:  # noqa: BLE001 - a Triton that cannot build it here: the torch path
        logger.info("FP8 row quantization kernel unavailable on %s: %s", device, error)
        return False
    agrees = torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    if not agrees:
        logger.info("FP8 row quantization kernel differs from torch on %s; using torch's", device)
    return agrees


_QUANT_BLOCK = 1024  # elements of a row per pass: wider rows take several (K up to the 8B shape's 14336 and more)


def quantize_per_row_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_row` in one launch, one program a row: the same float32 scale (the row's absmax, at least
    1e-12, times FP8_MAX's float32 reciprocal) and the same float32 division by it before the cast to e4m3."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(next_power_of_2(k), _QUANT_BLOCK)
        _quantize_rows_kernel[(m,)](
            x, q, scale, k, x.stride(0), FP8_MAX, _INV_FP8_MAX, _MIN_SCALE, BLOCK=block, num_warps=4
        )
    return q, scale


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


if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, FMAX, INV_FMAX, MIN_SCALE, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        biggest = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            biggest = tl.maximum(biggest, tl.abs(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(biggest, axis=0), MIN_SCALE) * INV_FMAX
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            v = tl.math.div_rn(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32), scale)
            v = tl.minimum(tl.maximum(v, -FMAX), FMAX)
            tl.store(q_ptr + row * K + k, v.to(q_ptr.dtype.element_ty), mask=k < K)
