"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer.

Math follows Hugging Face Llama: the sum x + residual is rounded to the input dtype (it becomes the next
residual), then normalised in float32 and scaled by the weight.
"""

import torch

from weir_server.kernels import HAS_TRITON, next_power_of_2, require_triton, tl, triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference in float64: x [..., hidden] -> x / rms(x) * weight, float64."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference, in place: residual <- x + residual; x <- rms_norm(residual). Returns (x, residual)."""
    residual.copy_(x.double() + residual.double())
    x.copy_(rms_norm_ref(residual, weight, eps))
    return x, residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton kernel: x [..., hidden] -> a new tensor in x's dtype."""
    out = torch.empty_like(x)
    _launch(x, None, weight, eps, out)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel, in place: residual <- x + residual; x <- rms_norm(residual). Returns (x, residual)."""
    _launch(x, residual, weight, eps, x)
    return x, residual


def _launch(x, residual, weight, eps, out) -> None:
    require_triton()
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    if rows == 0:
        return
    if any(t is not None and not t.is_contiguous() for t in (x, residual, out)):
        raise ValueError("rms_norm needs contiguous tensors")
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        hidden,
        eps,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 256, 1), 16),
    )


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        hidden,
        eps,
        BLOCK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64) * hidden
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x.to(tl.float32) + tl.load(residual_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(residual_ptr.dtype.element_ty)
            tl.store(residual_ptr + row + cols, x, mask=mask)
        x = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + cols, (x * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask)
