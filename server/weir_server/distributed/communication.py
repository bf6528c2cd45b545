"""Collectives of the tensor-parallel group, and the encoding of a step's inputs sent from rank 0 to workers.

The collectives are plain torch.distributed calls enqueued on the current stream: no host syncs, so they run
inside captured CUDA graphs too (NCCL kernels are graph-capturable). In a group of one each is a no-op.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from weir_server.distributed import parallel_state

T = TypeVar("T")


class StepPublisher(Protocol):
    """Rank 0's side of the step channel: every rank must run the same forward passes in the same order."""

    def publish(self, step: Any) -> None:
        """Send one step's model inputs to every other rank (raises if a rank is gone)."""


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


def map_tensors(obj: T, fn: Any) -> T:
    """`obj` with `fn` applied to every tensor inside its dataclass fields, lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)  # type: ignore[no-any-return]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    if isinstance(obj, list | tuple):
        return type(obj)(map_tensors(item, fn) for item in obj)  # type: ignore[return-value]
    if isinstance(obj, dict):
        return {key: map_tensors(value, fn) for key, value in obj.items()}  # type: ignore[return-value]
    return obj


def encode_step(step: Any) -> bytes:
    """A step's inputs as bytes, tensors copied to the host (device tensors cannot cross processes by pickle)."""
    return pickle.dumps(map_tensors(step, lambda t: t.cpu()), protocol=pickle.HIGHEST_PROTOCOL)


def decode_step(data: bytes, device: torch.device) -> Any:
    """The inverse of `encode_step`, tensors placed on this rank's device."""
    step = pickle.loads(data)  # noqa: S301 - bytes from rank 0 of our own process group, over a private pipe
    return map_tensors(step, lambda t: t.to(device, non_blocking=True))
