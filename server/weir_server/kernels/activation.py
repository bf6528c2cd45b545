"""SwiGLU's gate: silu(gate) * up over a fused [..., 2 * d] projection (gate first, as Llama packs it)."""

import torch
import torch.nn.functional as F

from weir_server.kernels import HAS_TRITON, require_triton, tl, triton

BLOCK = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference in float64: x [..., 2d] -> silu(x[..., :d]) * x[..., d:], float64."""
    gate, up = x.double().chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton kernel: x [..., 2d] -> [..., d] in x's dtype; the gate is computed in float32."""
    require_triton()
    d = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], d))
    rows = out.numel() // d if d else 0
    if rows == 0:
        return out
    if x.stride(-1) != 1:
        raise ValueError("silu_and_mul needs a contiguous last dimension")
    flat = x.reshape(rows, 2 * d)  # a view whenever the rows are evenly strided
    _silu_and_mul_kernel[(rows, triton.cdiv(d, BLOCK))](flat, out, d, flat.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
