"""Launching a Triton kernel through its compiled handle, for kernels an eager step calls many times.

`kernel[grid](*args)` binds every argument, derives Triton's specialization (each pointer's alignment, which ints
are 1 or multiples of 16) and hashes it into a cache key on every call: about 35 us of host time a launch on the
H100 machine's host, which an eager prefill step with adapters paid 128 times. `CompiledLaunch` keeps the
compiled kernel under a key the caller computes from what it knows varies, and launches it directly afterwards.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any


class CompiledLaunch:
    """One Triton JIT function, launched through its compiled kernel once a key has been seen.

    The caller's key must determine the specialization of every argument: the exact value of each constexpr and
    of each int that is not in the kernel's `do_not_specialize`, or at least whether it is 1 or a multiple of 16;
    each tensor's dtype; and each pointer's 16-byte alignment. Arguments go positionally, constexprs included, in
    the kernel's own order (the compiled launcher takes them so).
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._compiled: dict[Hashable, Any] = {}

    def __call__(self, key: Hashable | None, grid: Sequence[int], *args: Any) -> None:
        """Launch on `grid`; key None (the caller could not vouch for the specialization): Triton's own path."""
        kernel = None if key is None else self._compiled.get(key)
        if kernel is not None:
            kernel[(*grid, 1, 1)[:3]](*args)  # the compiled launcher reads all three grid sizes
            return
        kernel = self.fn[grid](*args)  # the JIT path: binds, compiles on first sight, launches
        if kernel is not None and key is not None:
            self._compiled[key] = kernel


def aligned(*tensors: Any) -> bool:
    """Whether every tensor's data starts on a 16-byte boundary (Triton specializes pointers on it)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def int_class(value: int) -> tuple[bool, int]:
    """How Triton specializes a non-constexpr int: its width (64 bits past int32), and 1, a multiple of 16 or
    neither (0)."""
    return value >= 2**31, 1 if value == 1 else 16 if value % 16 == 0 else 0
