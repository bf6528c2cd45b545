"""Collectives of the tensor-parallel group.

The collectives are plain torch.distributed calls enqueued on the current stream: no host syncs, so they run
inside captured CUDA graphs too (NCCL kernels are graph-capturable). In a group of one each is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from weir_server.distributed import parallel_state


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    state = parallel_state.get()
    if state.is_parallel:
        dist.all_reduce(x, group=state.group)
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on every rank -> [..., world_size * n], rank r's part at columns r*n:(r+1)*n."""
    state = parallel_state.get()
    if not state.is_parallel:
        return x
    x = x.contiguous()
    gathered = x.new_empty((state.world_size * x.shape[0], *x.shape[1:]))  # rank r's copy at rows r*len(x)...
    if x.numel():  # every rank has the same shape, so all skip together
        _all_gather_single(gathered, x, group=state.group)
    gathered = gathered.view(state.world_size, *x.shape)
    return gathered.movedim(0, -2).reshape(*x.shape[:-1], state.world_size * x.shape[-1])


# Renamed in newer torch; the old name still works there but warns.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def min_across_ranks(value: int) -> int:
    """The smallest of each rank's `value` (e.g. KV blocks that fit), so every rank sizes alike."""
    state = parallel_state.get()
    if not state.is_parallel:
        return value
    t = torch.tensor([value], dtype=torch.long, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=state.group)
    return int(t.item())
