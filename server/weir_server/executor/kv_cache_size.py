"""How much RAM the KV cache takes on CPU when `--kv-cache-memory-gb` is not given: sized from the model and the
machine rather than a fixed amount.

The pool is an anonymous memory map whose pages become resident as blocks are first written, but prefix caching
keeps freed blocks and hands out untouched ones first, so a long-running server ends up holding the whole pool:
its size is the server's memory. The default holds every admitted sequence (`max_num_seqs`) at a short chat's
context and one sequence of the full `max_model_len`, and never more than a fraction of the memory available at
start-up (the weights, the other processes and the page cache need the rest).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CONTEXT_PER_SEQ = 128  # tokens of context planned for each of max_num_seqs sequences
AVAILABLE_FRACTION = 0.125  # at most this share of the RAM available at start-up


def default_cpu_kv_cache_bytes(
    bytes_per_token: int, max_num_seqs: int, max_model_len: int, available_bytes: int | None
) -> int:
    """max(max_num_seqs x min(max_model_len, CONTEXT_PER_SEQ), max_model_len) tokens, capped at
    AVAILABLE_FRACTION of `available_bytes` (None: unknown, no cap) but never below one block's worth."""
    tokens = max(max_num_seqs * min(max_model_len, CONTEXT_PER_SEQ), max_model_len)
    wanted = tokens * bytes_per_token
    if available_bytes is None:
        return wanted
    return max(min(wanted, int(available_bytes * AVAILABLE_FRACTION)), bytes_per_token)


def available_memory_bytes() -> int | None:
    """RAM this process may still take: MemAvailable, lowered by a cgroup (container) limit; None if unknown."""
    available = _meminfo_available()
    limit = _cgroup_headroom()
    if available is None or limit is None:
        return available if limit is None else limit
    return min(available, limit)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as error:
        logger.debug("no MemAvailable: %s", error)
    return None


def _cgroup_headroom() -> int | None:
    """cgroup v2 memory.max minus memory.current, where a limit is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None
