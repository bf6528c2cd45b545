"""How much a constraint may cost: admission limits, the compile budget and pool, and the compiled-grammar cache.

Sized from measurements with SmolLM2's 49k vocabulary on 2 cores (xgrammar 0.2.9): a typical schema compiles in
1-10 ms to 5-200 KB, a 30-tool call tag in 0.1 s to 1 MB, while a schema nested 450 deep took 13 s, a 200 KB grammar
3.8 s and 48 MB, and a 2 MB grammar over 2 minutes (issue 23). Costs grow with the vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from weir_server.engine.types import MAX_CONSTRAINT_BYTES, MAX_CONSTRAINT_DEPTH, ConstraintLimits

MIB = 1024 * 1024
COMPILE_TIMEOUT_S = 10.0  # one compile's wall time in a worker; past it the worker is killed
COMPILE_WORKERS = max(1, min(2, (os.cpu_count() or 1) // 2))  # worker processes; each compiles on one core
COMPILE_QUEUE = 64  # new constraints waiting for a worker; past it RESOURCE_EXHAUSTED
CACHE_MEMORY_BYTES = 512 * MIB  # compiled grammars kept for reuse, least recently used evicted first
MAX_COMPILED_BYTES = 64 * MIB  # what one compiled grammar may hold (a 200 KB grammar holds about 45 MB)
WORKER_MEMORY_BYTES = 2048 * MIB  # address space a worker may add while compiling; past it the compile fails
# The `weir serve` flags that set them (named in refusals).
COMPILE_TIMEOUT_FLAG = "--constraint-compile-timeout"
COMPILE_QUEUE_FLAG = "--constraint-compile-queue"
MAX_COMPILED_FLAG = "--max-compiled-constraint-mb"
WORKER_MEMORY_FLAG = "--constraint-worker-memory-mb"


@dataclass(frozen=True)
class StructuredOutputConfig:
    """What constraints may cost the server. Limits are checked before any work; a compile runs in a worker
    process that is killed past `compile_timeout_s` or when its request goes away."""

    max_constraint_bytes: int = MAX_CONSTRAINT_BYTES
    max_constraint_depth: int = MAX_CONSTRAINT_DEPTH
    compile_timeout_s: float = COMPILE_TIMEOUT_S
    compile_workers: int = COMPILE_WORKERS
    compile_queue: int = COMPILE_QUEUE
    cache_memory_bytes: int = CACHE_MEMORY_BYTES
    max_compiled_bytes: int = MAX_COMPILED_BYTES
    worker_memory_bytes: int = WORKER_MEMORY_BYTES

    def __post_init__(self) -> None:
        if self.compile_timeout_s <= 0 or self.compile_workers < 1 or self.compile_queue < 0:
            raise ValueError("compile_timeout_s must be > 0, compile_workers >= 1 and compile_queue >= 0")
        if not 0 < self.max_compiled_bytes <= self.cache_memory_bytes:
            # A grammar the cache cannot hold would be compiled again on the engine's thread when a request starts.
            raise ValueError("max_compiled_bytes must be > 0 and at most cache_memory_bytes")

    @property
    def limits(self) -> ConstraintLimits:
        return ConstraintLimits(self.max_constraint_bytes, self.max_constraint_depth)
