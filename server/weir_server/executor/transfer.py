"""Host-to-device copies that never make the host wait for the device."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: torch.Tensor | Sequence[int] | Sequence[float] | Sequence[bool] | Sequence[Sequence[int]],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A copy of host `values` on `device`. On CUDA it goes through pinned memory, asynchronously: a copy from
    pageable memory first waits for everything already queued on the stream, so the engine, which launches a step
    before the previous one has finished, would wait for that step instead of preparing the next."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
