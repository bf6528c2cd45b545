"""LoRA on the tensor-parallel linear layers: each token of a step adds the low-rank update of its own adapter.

`LoRALinear` wraps a column- or row-parallel layer and holds its adapters' A and B for `max_loras` device slots
(zeros where a slot is empty or an adapter leaves the layer alone); the step's `LoRAState` says which slot each
token uses (-1: the base model only). A fused layer (q/k/v, gate/up) keeps one A per slice stacked
[S * R, in] and one B [out, R] whose rows read their own slice's R columns (`row_offset`), so the adapter's
q_proj, k_proj and v_proj each land on their own rows. Scaling (alpha / r, or / sqrt(r) with rslora) is folded
into B when a slot is filled.

Tensor parallelism shards a slot like its layer: a column-parallel layer keeps this rank's rows of B and all of
A; a row-parallel one keeps this rank's columns of A and all of B, and its update joins the partial sums before
the layer's all-reduce (the update is linear in x, so the sum over ranks is the whole update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.distributed.communication import all_reduce
from weir_server.kernels import HAS_TRITON
from weir_server.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

# The PEFT module names Weir adapts, and the layer of ours (and its slice) each one lands in.
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_SLICES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


@dataclass(frozen=True)
class LoRATarget:
    """One of our linear layers an adapter may change, in full (unsharded) shapes."""

    name: str  # our module's name, e.g. model.layers.0.self_attn.qkv_proj
    slice_modules: tuple[str, ...]  # the PEFT module of each output slice
    in_features: int
    slice_sizes: tuple[int, ...]  # output features of each slice


LoRASpec = dict[str, LoRATarget]  # by our module name


# The grouped (SGMV) kernels for every CUDA step (eager ones too) instead of the per-token (BGMV) kernel under CUDA
# graphs and batched torch per slot in eager steps. Checked on an H100 (tests/server/lora/test_lora_gpu.py) on
# 2026-12-07; the switch stays so the per-token kernel can be compared.
USE_SGMV = True

SlotWeights = list[tuple[torch.Tensor, torch.Tensor] | None]  # per output slice: full A [r, in], scaled B [out, r]


class LoRAState:
    """Which adapter slot each token of this step uses, shared by every LoRA layer of a model.

    Eager CPU steps give `groups`: (slot, token rows or None for all) per slot in use, for batched matmuls per slot.
    CUDA steps give `slots` [T], each token's slot, which the Triton kernels read (a static buffer under a CUDA
    graph). Neither: no token uses
    an adapter, and the layers add nothing.
    """

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        self.slots: torch.Tensor | None = None
        # The slots grouped by slot for the grouped kernels: made on the host for an eager step, by the first layer
        # under a CUDA graph (from the static slots buffer).
        self.segments: tuple[torch.Tensor, ...] | None = None

    @property
    def active(self) -> bool:
        return bool(self.groups) or self.slots is not None

    def set_base_only(self) -> None:
        self.groups, self.slots = [], None

    def set_tokens(self, seq_slots: list[int], seq_lens: list[int], device: torch.device) -> None:
        """An eager step: sequence i's `seq_lens[i]` tokens use slot `seq_slots[i]`."""
        self.slots, self.segments = None, None
        used = sorted({s for s in seq_slots if s >= 0})
        if not used:
            self.groups = []
            return
        if USE_SGMV and uses_kernel(device):
            # On CUDA the grouped kernel takes any mix in one launch per layer: batched torch per slot costs a dozen
            # small launches per slot and layer, which made prefills with 16 adapters several times slower.
            from weir_server.kernels.lora import SGMV_BLOCK_T, host_segments, split_segments

            self.groups = []
            # The slots grouped on the host and copied once: on the device the grouping is ten small ops a step.
            # Through pinned memory: a copy from pageable memory first waits for the whole stream, so every step
            # with adapters waited for the step before it (the engine launches a step before the last finishes).
            packed = torch.from_numpy(host_segments(seq_slots, seq_lens, self.max_loras, SGMV_BLOCK_T))
            packed = packed.pin_memory().to(device, non_blocking=True)
            self.slots, self.segments = split_segments(packed, sum(seq_lens), self.max_loras)
            return
        if len(used) == 1 and min(seq_slots) >= 0:
            self.groups = [(used[0], None)]
            return
        per_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_lens))
        self.groups = [(s, (per_token == s).nonzero().flatten().to(device)) for s in used]

    def set_graph_slots(self, slots: torch.Tensor) -> None:
        """A CUDA-graph step (capture): the kernels read each token's slot from this static buffer on replay."""
        self.groups, self.slots, self.segments = [], slots, None


class LoRALinear(nn.Module):
    """A parallel linear layer plus, per token, the low-rank update of that token's adapter slot."""

    lora_a: torch.Tensor  # [max_loras, slices * max_rank, in (this rank's)]
    lora_b: torch.Tensor  # [max_loras, out (this rank's), max_rank], scaled
    row_offset: torch.Tensor  # [out] int32: the first column of the shrink product each output row reads
    lora_ranks: torch.Tensor  # [max_loras] int32: `slot_ranks` on the device, which the grouped kernels read

    def __init__(
        self,
        base: ColumnParallelLinear | RowParallelLinear,
        target: LoRATarget,
        max_loras: int,
        max_rank: int,
        state: LoRAState,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.target = target
        self.state = state
        self.max_rank = max_rank
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.tp_rank, self.tp_size = base.tp_rank, base.tp_size
        weight = base.weight
        out_local, in_local = weight.shape
        # This rank's rows of each slice: (first local row, rows, first row in the full slice).
        self.slices = _local_slices(base)
        num_slices = len(self.slices)
        dtype, device = weight.dtype, weight.device
        lora_a = torch.zeros(max_loras, num_slices * max_rank, in_local, dtype=dtype, device=device)
        lora_b = torch.zeros(max_loras, out_local, max_rank, dtype=dtype, device=device)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        offsets = torch.zeros(out_local, dtype=torch.int32, device=weight.device)
        for i, (start, rows, _) in enumerate(self.slices):
            offsets[start : start + rows] = i * max_rank
        self.register_buffer("row_offset", offsets, persistent=False)
        # Tiles of output rows the grouped (SGMV) kernel takes: each must lie in one slice; None = per-token kernel.
        self.block_n = next((b for b in (64, 32, 16) if all(rows % b == 0 for _, rows, _ in self.slices)), None)
        if not USE_SGMV:
            self.block_n = None
        self.slot_ranks = [0] * max_loras  # the highest rank a slot's adapter uses here (0: leaves it alone)
        # Read by the captured kernels on every replay, so a slot whose adapter leaves this layer alone (an
        # attention-only adapter in an MLP layer) costs no work there, whatever was loaded since the capture.
        self.register_buffer("lora_ranks", torch.zeros(max_loras, dtype=torch.int32, device=device), persistent=False)

    def set_slot(self, slot: int, weights: SlotWeights | None) -> None:
        """Fill a slot with this rank's shard of an adapter's matrices (None or missing slices: zeros)."""
        a, b, rank = self.lora_a[slot], self.lora_b[slot], self.max_rank
        a.zero_()
        b.zero_()
        self.slot_ranks[slot] = 0
        for i, pair in enumerate(weights or []):
            if pair is None:
                continue
            full_a, full_b = pair
            r = full_a.shape[0]
            start, rows, source = self.slices[i]
            if self.row_parallel:
                cols = a.shape[1]
                full_a = full_a[:, self.tp_rank * cols : (self.tp_rank + 1) * cols]
            a[i * rank : i * rank + r].copy_(full_a)
            b[start : start + rows, :r].copy_(full_b[source : source + rows])
            self.slot_ranks[slot] = max(self.slot_ranks[slot], r)
        self.lora_ranks[slot] = self.slot_ranks[slot]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.row_parallel and self.tp_size > 1:
            out = F.linear(x, base.weight)
            if self.state.active:
                self._add_lora(x, out)
            out = all_reduce(out)
            return out if base.bias is None else out + base.bias
        out = base(x)
        if self.state.active:
            self._add_lora(x, out)
        return out

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor) -> None:
        state = self.state
        if state.slots is not None:
            from weir_server.kernels.lora import SGMV_BLOCK_T, lora_apply, lora_apply_sgmv, lora_segments

            if self.block_n is not None:
                capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
                if not any(self.slot_ranks) and not capturing:
                    return  # an eager step and no adapter here (a graph keeps the kernels for adapters loaded later)
                if state.segments is None:  # once per step: every layer groups the same tokens
                    state.segments = lora_segments(state.slots, self.lora_a.shape[0], SGMV_BLOCK_T)
                a, b, slots, ranks = self.lora_a, self.lora_b, state.slots, self.lora_ranks
                lora_apply_sgmv(x, out, a, b, slots, self.row_offset, self.block_n, state.segments, ranks)
            else:
                lora_apply(x, out, self.lora_a, self.lora_b, state.slots, self.row_offset)
            return
        for slot, rows in state.groups:
            r = self.slot_ranks[slot]
            if r == 0:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            delta = self._delta(xs, slot, r)
            if rows is None:
                out.add_(delta)
            else:
                out.index_add_(0, rows, delta)

    def _delta(self, x: torch.Tensor, slot: int, r: int) -> torch.Tensor:
        """x [n, in] -> the slot's update [n, out], over its real rank only (the padding is zeros)."""
        a, b, rank = self.lora_a[slot], self.lora_b[slot], self.max_rank
        if len(self.slices) == 1:
            return (x @ a[:r].T) @ b[:, :r].T
        parts = []
        for i, (start, rows, _) in enumerate(self.slices):
            parts.append((x @ a[i * rank : i * rank + r].T) @ b[start : start + rows, :r].T)
        return torch.cat(parts, dim=-1)


def uses_kernel(device: torch.device) -> bool:
    """Whether this device applies adapters with the Triton kernels (CUDA-graph steps always, eager ones with SGMV)."""
    return device.type == "cuda" and HAS_TRITON


def _local_slices(base: ColumnParallelLinear | RowParallelLinear) -> list[tuple[int, int, int]]:
    """(first local output row, rows, first row within the full slice) of each output slice on this rank."""
    if isinstance(base, QKVParallelLinear):
        kv_start = (base.tp_rank // base.kv_replicas) * base.kv_size
        return [
            (0, base.q_size, base.tp_rank * base.q_size),
            (base.q_size, base.kv_size, kv_start),
            (base.q_size + base.kv_size, base.kv_size, kv_start),
        ]
    if isinstance(base, MergedColumnParallelLinear):
        starts = [sum(base.local_sizes[:i]) for i in range(len(base.local_sizes))]
        return [(s, n, base.tp_rank * n) for s, n in zip(starts, base.local_sizes, strict=True)]
    rows = base.weight.shape[0]
    if isinstance(base, ColumnParallelLinear):
        return [(0, rows, base.tp_rank * rows)]
    return [(0, rows, 0)]


def _full_target(name: str, base: ColumnParallelLinear | RowParallelLinear, modules: tuple[str, ...]) -> LoRATarget:
    if isinstance(base, QKVParallelLinear):
        q, kv = base.total_num_heads * base.head_dim, base.total_num_kv_heads * base.head_dim
        return LoRATarget(name, modules, base.weight.shape[1], (q, kv, kv))
    if isinstance(base, MergedColumnParallelLinear):
        return LoRATarget(name, modules, base.weight.shape[1], tuple(base.output_sizes))
    if isinstance(base, ColumnParallelLinear):
        return LoRATarget(name, modules, base.weight.shape[1], (base.full_output_size,))
    assert isinstance(base, RowParallelLinear)
    return LoRATarget(name, modules, base.full_input_size, (base.weight.shape[0],))


_LINEAR_TYPES = (ColumnParallelLinear, RowParallelLinear)


def wrap_lora_layers(model: nn.Module, max_loras: int, max_rank: int) -> tuple[LoRAState, dict[str, LoRALinear]]:
    """Wrap the model's q/k/v, o, gate/up and down projections (by their names, as every family using the shared
    layers names them) in LoRALinear; call after loading the weights. Returns the step state and the layers."""
    state = LoRAState(max_loras)
    layers: dict[str, LoRALinear] = {}
    names = [name for name, _ in model.named_modules() if name.rpartition(".")[2] in FUSED_SLICES]
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        base = getattr(owner, attr)
        if not isinstance(base, _LINEAR_TYPES):
            continue
        expected = {"qkv_proj": QKVParallelLinear, "gate_up_proj": MergedColumnParallelLinear}.get(attr)
        if expected is not None and not isinstance(base, expected):
            continue  # a fused layer of another layout (e.g. a whole-matrix qkv): not one PEFT's names map onto
        layer = LoRALinear(base, _full_target(name, base, FUSED_SLICES[attr]), max_loras, max_rank, state)
        setattr(owner, attr, layer)
        layers[name] = layer
    return state, layers


def lora_spec(layers: dict[str, LoRALinear]) -> LoRASpec:
    """The full shapes an adapter's matrices must have, by layer."""
    return {name: layer.target for name, layer in layers.items()}
