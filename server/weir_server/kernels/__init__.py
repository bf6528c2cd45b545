"""Triton kernels for the GPU executor, each beside the plain-torch reference it is tested against.

The package imports without Triton, and imports it only where a kernel can run (a CUDA device, or Triton's
interpreter): references always work, and every kernel wrapper calls `require_triton()` first. Callers choose a
kernel only when `HAS_TRITON` is true and the tensors are on CUDA.
"""

import logging
import os

logger = logging.getLogger(__name__)


def _kernels_can_run() -> bool:
    """Whether to import Triton: only where a kernel can run, with a CUDA device or under Triton's interpreter
    (TRITON_INTERPRET=1, the tests' CPU runs). On a CPU-only machine its import alone held 71 MiB of every engine
    process."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


triton = tl = None
if _kernels_can_run():
    try:
        import triton
        import triton.language as tl
    except ImportError as _error:  # CUDA without Triton: the references still import and run
        logger.debug("triton unavailable, kernels disabled: %s", _error)
        triton = tl = None

HAS_TRITON = triton is not None


def require_triton() -> None:
    """Raise ImportError when Triton is missing or not imported here (no CUDA device), so a kernel call fails with
    a clear message."""
    if not HAS_TRITON:
        raise ImportError("this kernel needs triton and a CUDA device (TRITON_INTERPRET=1 runs it on the CPU)")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (and >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


__all__ = ["HAS_TRITON", "next_power_of_2", "require_triton", "tl", "triton"]
