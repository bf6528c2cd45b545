"""This process's place in the tensor-parallel group: rank, world size, device and process group.

Every process starts as rank 0 of a group of one, which never touches torch.distributed. `initialize()`
runs once per process (the launcher on rank 0, the worker main on the others) before the model is built,
because the parallel layers read the rank and size when they are constructed; `destroy()` undoes it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelState:
    """The tensor-parallel group as this process sees it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    group: dist.ProcessGroup | None = None  # None for a group of one

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1


_state = ParallelState()  # process-wide, like torch.distributed's own default group


def get() -> ParallelState:
    """The current tensor-parallel state (a group of one unless `initialize()` ran)."""
    return _state


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.world_size


def initialize(rank: int, world_size: int, init_method: str, device: torch.device, timeout_s: float) -> ParallelState:
    """Join the group (NCCL on CUDA, gloo on CPU); blocks until all `world_size` ranks have joined."""
    global _state
    if _state.is_parallel:
        raise RuntimeError("tensor parallelism is already initialized in this process")
    if world_size < 2:
        raise ValueError(f"a tensor-parallel group needs at least 2 ranks, got {world_size}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,  # NCCL communicators are made now, not mid-capture
    )
    group = dist.group.WORLD
    assert group is not None
    # One collective now so that lazily made communicators exist before any CUDA graph is captured.
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe, group=group)
    if int(probe.item()) != world_size:
        raise RuntimeError(f"tensor-parallel probe all-reduce gave {probe.item()}, expected {world_size}")
    _state = ParallelState(rank, world_size, device, group)
    logger.info("tensor-parallel rank %d of %d on %s (%s)", rank, world_size, device, backend)
    return _state


def destroy(timeout_s: float = 10.0) -> None:
    """Leave the group and return to a group of one; gives up waiting after `timeout_s` (a peer may be gone)."""
    global _state
    if _state.is_parallel and dist.is_initialized():
        closer = threading.Thread(target=dist.destroy_process_group, name="weir-tp-destroy", daemon=True)
        closer.start()
        closer.join(timeout_s)
        if closer.is_alive():  # NCCL teardown can take this long; the process is about to exit or start anew
            logger.info("leaving the tensor-parallel group takes over %.0fs; not waiting for it", timeout_s)
    _state = ParallelState()


@contextmanager
def group_of_one() -> Iterator[None]:
    """Build modules inside as if this process were alone: unsharded, and (since the parallel layers read the size
    when constructed) never taking part in a collective. Rank 0's speculative draft model is built so."""
    global _state
    saved = _state
    _state = ParallelState(device=saved.device)
    try:
        yield
    finally:
        _state = saved


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, or a clear error naming `what` when it does not split evenly."""
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator}); "
            "choose a --tensor-parallel-size that divides it"
        )
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, world_size: int) -> int:
    """KV heads each rank holds: split when there are enough, else each rank keeps one (replicated) head."""
    if num_kv_heads >= world_size:
        return divide(num_kv_heads, world_size, "the number of KV heads")
    if world_size % num_kv_heads != 0:
        raise ValueError(
            f"the tensor-parallel size ({world_size}) must divide the KV heads ({num_kv_heads}) "
            "or be a multiple of them"
        )
    return 1
