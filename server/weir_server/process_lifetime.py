"""Child processes of the server (engine core, tensor-parallel workers) end when the server does; what a process
loaded at start-up stays out of the garbage collector's way, and the heap its loading freed goes back to the OS."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import wait

# glibc's mallopt parameters (malloc.h), and the thresholds its dynamic ones rise to on 64-bit hosts.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def exit_with_parent() -> None:
    """In a multiprocessing child: exit at once when the parent process is gone, whatever this one is doing."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="weir-parent-watch", daemon=True).start()


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, weights' Python objects, tokenizers) out of the cyclic collector's
    reach: they live as long as the process, yet each full collection would walk them all. Measured at 512
    sequences per engine step: collections cost 2.6 ms per step on average before, none after. Then the heap
    that loading freed is handed back (`trim_heap`)."""
    gc.collect()
    trim_heap()
    gc.freeze()
    # Handed back at exit, so the collection at shutdown still finds them (native extensions report leaks else).
    atexit.register(gc.unfreeze)


def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (it has malloc_trim and mallopt), else None."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # no dlopen(NULL) (Windows)
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


@contextlib.contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """While a model loads: every allocation of `threshold` bytes or more gets a memory map of its own, unmapped
    when freed. Loading frees much in between what stays (dequantized weights replaced by packed copies, their
    float32 temporaries), and glibc's heap would keep those holes: a CPU engine core of SmolLM2-135M peaked at
    811 MiB at start-up this way against 837 (one process replaying the load: 840 against 890 to 970). Afterwards
    the thresholds are set where glibc's dynamic ones end up (maps from 32 MiB, heap trimmed past 64 MiB), so the
    steps reuse heap memory as they did (glibc only)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). A model load frees
    much (GGUF metadata, dequantized weights replaced by packed ones) in between what stays, so glibc keeps those
    pages: serving SmolLM2-135M on CPU, 40 to 85 MiB of an engine core's RSS and 38 of the server process's."""
    libc = _glibc()
    if libc is not None:  # elsewhere (musl, macOS) the allocator keeps its own counsel
        libc.malloc_trim(0)


def keep_unusable_triton_out() -> None:
    """Where no Triton kernel can run (no CUDA device and no TRITON_INTERPRET: `kernels.HAS_TRITON` is false), make
    `import triton` fail in this process, so libraries that probe for it do not load it either: torch._dynamo does,
    imported by transformers' modeling code that maps a GGUF file's tensor names, and held about 70 MiB of a CPU
    engine core (64 of them libtriton's pages). For a process of its own only: a test run's process would lose
    Triton."""
    from weir_server.kernels import HAS_TRITON

    if not HAS_TRITON and "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # None here is how Python marks "not importable"
