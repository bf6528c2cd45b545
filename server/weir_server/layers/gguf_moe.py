"""Routed experts whose GGUF blocks stay packed (`--quantization gguf`).

A GGUF file stacks each layer's experts in three tensors of one quantization type each (gate and up [E, I, H],
down [E, H, I]); `models/gguf_tensors.py` hands them over packed (`PackedExperts`). On a CPU each expert's gate and
up rows become one packed form and its down rows another, the forms the dense GGUF layers use (the C++ integer-dot
ops up to a few rows, dequantized tiles beyond). On CUDA the layer's gate/up rows (gate and up of one type) and its
down rows become two stacks of planes (`kernels.gguf_planes`) that the fused Triton kernel reads
(`fused_experts_planes`). Either way a 4-bit mixture of experts holds about its file's bytes instead of two bytes a
weight. Elsewhere (tensor parallelism, whose down shards would cut blocks; gate and up of different types on CUDA;
experts stored as floats) the experts are dequantized into `FusedMoE`'s stacked weights, with a log line.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import nn

from weir_server.kernels import HAS_TRITON
from weir_server.kernels.fused_moe import fused_experts_planes
from weir_server.kernels.gguf_dequant import GGMLType
from weir_server.kernels.gguf_planes import to_planes
from weir_server.layers.fused_moe import ExpertShard, FusedMoE, experts_by_rows, select_experts
from weir_server.layers.gguf_weights import Int8BlockRows, PlanesRows, RowsForm, rows_for_device
from weir_server.layers.linear import WeightSource, check_shape
from weir_server.layers.quantized_linear import PackedExperts

logger = logging.getLogger(__name__)

_PACKED_KINDS = ("gate", "up", "down")


class GGUFFusedMoE(FusedMoE):
    """`FusedMoE` over GGUF experts: packed per expert on a CPU, dequantized into the stacked weights elsewhere."""

    def __init__(self, base: FusedMoE) -> None:
        nn.Module.__init__(self)
        for attr in ("tp_rank", "tp_size", "num_experts", "top_k", "renormalize", "hidden_size"):
            setattr(self, attr, getattr(base, attr))
        self.full_intermediate_size, self.intermediate_size = base.full_intermediate_size, base.intermediate_size
        # Placeholders: the model's dtype and device through materialization, and the names load_weights looks up.
        self.w13_weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self._arrived: list[tuple[str, WeightSource, str, ExpertShard]] = []
        self._filled: set[ExpertShard] = set()
        self.gate_up: nn.ModuleList | None = None  # per expert: its gate/up form(s); None until loaded packed
        self.down: nn.ModuleList | None = None
        self.planes: nn.ModuleList | None = None  # CUDA: the layer's gate/up and down stacks as planes

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Keep each stacked (or per-expert) tensor until the layer has them all, then take the layer's form."""
        which = "w2_weight" if param is self.w2_weight else "w13_weight"
        self._arrived.append((which, src, name, shard_id))
        self._filled.update(self.shards_filled(shard_id))
        if len(self._filled) == 3 * self.num_experts:
            arrived, self._arrived, self._filled = self._arrived, [], set()
            self._finalize(arrived)

    def _finalize(self, arrived: list[tuple[str, WeightSource, str, ExpertShard]]) -> None:
        device = self.w13_weight.device
        packed = {shard[1]: (src, name) for _, src, name, shard in arrived if isinstance(src, PackedExperts)}
        if self.tp_size == 1 and set(packed) == set(_PACKED_KINDS):
            if device.type == "cpu":
                self._take_packed(packed)
                return
            if device.type == "cuda" and HAS_TRITON and packed["gate"][0].qtype == packed["up"][0].qtype:
                self._take_planes(packed, device)
                return
        logger.info(
            "%s: %s experts dequantized (they stay packed without tensor parallelism, on a CPU, or on CUDA with "
            "gate and up of one type)",
            arrived[0][2].rpartition(".")[0],
            "/".join(sorted({src.qtype.name for src, _ in packed.values()})) or "float",
        )
        dtype, full = self.w13_weight.dtype, self.intermediate_size
        self.w13_weight = nn.Parameter(
            torch.empty(self.num_experts, 2 * full, self.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(self.num_experts, self.hidden_size, full, dtype=dtype, device=device), requires_grad=False
        )
        for which, src, name, shard_id in arrived:
            super().weight_loader(getattr(self, which), src, name, shard_id)

    def _take_packed(self, packed: dict[str, tuple[PackedExperts, str]]) -> None:
        """Each expert's rows in their CPU forms (the file's shapes checked as FusedMoE's loader checks them)."""
        experts, hidden, width = self.num_experts, self.hidden_size, self.full_intermediate_size
        shapes = {"gate": (experts, width, hidden), "up": (experts, width, hidden), "down": (experts, hidden, width)}
        for kind, (src, name) in packed.items():
            check_shape(src, shapes[kind], name)
        (gate, _), (up, _), (down, _) = packed["gate"], packed["up"], packed["down"]
        dtype = self.w13_weight.dtype
        gate_up, downs = nn.ModuleList(), nn.ModuleList()
        for e in range(self.num_experts):
            if gate.qtype == up.qtype:  # one form: one op call for both halves
                forms = [_form(torch.cat((gate.raw[e], up.raw[e])), gate.qtype, self.hidden_size, dtype)]
            else:
                forms = [_form(src.raw[e], src.qtype, self.hidden_size, dtype) for src in (gate, up)]
            gate_up.append(nn.ModuleList(forms))
            downs.append(_form(down.raw[e], down.qtype, self.intermediate_size, dtype))
        self.gate_up, self.down = gate_up, downs

    def _take_planes(self, packed: dict[str, tuple[PackedExperts, str]], device: torch.device) -> None:
        """The layer's experts as two stacks of planes on `device`: [gate; up] rows of each expert in turn, then
        the down rows of each."""
        experts, hidden, width = self.num_experts, self.hidden_size, self.full_intermediate_size
        shapes = {"gate": (experts, width, hidden), "up": (experts, width, hidden), "down": (experts, hidden, width)}
        for kind, (src, name) in packed.items():
            check_shape(src, shapes[kind], name)
        (gate, _), (up, _), (down, _) = packed["gate"], packed["up"], packed["down"]
        gate_up = torch.cat((gate.raw.to(device), up.raw.to(device)), dim=1)  # [E, 2I, row bytes]
        w13 = to_planes(gate_up.reshape(experts * 2 * width, -1), gate.qtype)
        w2 = to_planes(down.raw.to(device).reshape(experts * hidden, -1), down.qtype)
        self.planes = nn.ModuleList([PlanesRows(w13), PlanesRows(w2)])

    def _run_expert(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        assert self.gate_up is not None and self.down is not None
        forms = cast(nn.ModuleList, self.gate_up[expert])
        outs = [cast(RowsForm, form).matmul(rows) for form in forms]
        gate, up = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)).chunk(2, dim=-1)
        return cast(RowsForm, self.down[expert]).matmul(torch.nn.functional.silu(gate) * up)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.planes is not None:
            w13, w2 = (cast(PlanesRows, p).planes for p in self.planes)
            topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
            return fused_experts_planes(hidden, w13, w2, topk_weights, topk_ids, self.num_experts)
        if self.gate_up is None:
            if self.w13_weight.numel() == 0:
                raise RuntimeError(f"{type(self).__name__}: weights not loaded")
            return super().forward(hidden, router_logits)
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        return experts_by_rows(hidden, topk_weights, topk_ids, self.num_experts, self._run_expert)

    def extra_repr(self) -> str:
        held = "planes" if self.planes is not None else "dense" if self.gate_up is None else "packed"
        return f"{super().extra_repr()}, {held}"


def _form(raw: torch.Tensor, qtype: GGMLType, cols: int, dtype: torch.dtype) -> RowsForm:
    """An expert's packed rows in the CPU form the dense GGUF layers use, holding the bytes once (the plain int8
    rows dropped once the op's layout has them, as GGUFLinear does)."""
    form = rows_for_device(raw.contiguous(), qtype, cols, dtype)
    if isinstance(form, Int8BlockRows):
        form.drop_plain_rows()
    return form
