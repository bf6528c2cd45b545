"""Triton kernels for the GPU executor, each beside the plain-torch reference it is tested against.

The package imports without Triton (CPU CI): references always work, and every kernel wrapper calls
`require_triton()` first. Callers choose a kernel only when `HAS_TRITON` is true and the tensors are on CUDA.
"""

import logging

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError as _error:  # CPU-only installs: the references still import and run
    logger.debug("triton unavailable, kernels disabled: %s", _error)
    triton = None
    tl = None

HAS_TRITON = triton is not None


def require_triton() -> None:
    """Raise ImportError when Triton is missing, so a kernel call fails with a clear message."""
    if not HAS_TRITON:
        raise ImportError("this kernel needs triton, which is not installed")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (and >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


__all__ = ["HAS_TRITON", "next_power_of_2", "require_triton", "tl", "triton"]
