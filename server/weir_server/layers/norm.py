"""RMSNorm, with a variant that adds the residual first and hands the sum back as the next residual."""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.kernels import HAS_TRITON
from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.kernels.rms_norm import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32 like the reference implementations."""

    fused_on_cuda = True  # whether forward may use the Triton/C++ kernels (a subclass with another formula may not)

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual).

        On CUDA one Triton kernel does it, on CPU one C++ op, writing in place: the sum over `residual`, the
        norm over `x`.
        """
        if self.fused_on_cuda and x.is_contiguous() and (residual is None or _same_layout(x, residual)):
            if x.is_cuda and HAS_TRITON:
                if residual is None:
                    return rms_norm(x, self.weight, self.eps)
                return fused_add_rms_norm(x, residual, self.weight, self.eps)
            if x.device.type == "cpu" and x.dtype == self.weight.dtype and (ops := cpu_ops()) is not None:
                if residual is None:
                    return ops.rms_norm(x, self.weight, self.eps)  # type: ignore[no-any-return]
                return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)  # type: ignore[no-any-return]
        if residual is None:
            return self._norm(x)
        summed = x + residual
        return self._norm(summed), summed

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op that accumulates in fp32 and rounds once (the reference rounds before the weight too).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _same_layout(x: torch.Tensor, residual: torch.Tensor) -> bool:
    return residual.is_contiguous() and residual.dtype == x.dtype and residual.shape == x.shape


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the stored weight is an offset, the scale is (1 + weight), all of it computed in fp32."""

    fused_on_cuda = False  # the Triton kernels scale by the weight itself

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # (1 + weight) is formed in fp32 as in transformers: in bf16 it would round away the offset's low bits.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
