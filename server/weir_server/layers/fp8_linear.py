"""Linear layers over FP8 (e4m3) weights: from an FP8 checkpoint (per-tensor or per-channel `weight_scale`, the
layout of vLLM's fp8 and compressed-tensors' float8 checkpoints) or quantized per output channel while a float
checkpoint loads (`--quantization fp8`).

`quantize_fp8_layers` swaps a model's tensor-parallel linear layers (on the meta device) for `Fp8Linear`. Each
rank's part of the weight is cut by the replaced layer's own `weight_loader` into a staging tensor, so the
sharding rules stay in layers/linear.py; per-tensor scales of fused q/k/v or gate/up become per-channel ones,
so each part keeps its own. Once every part is in, the layer takes its form: on GPUs with FP8 tensor cores
(compute capability 8.9+) `torch._scaled_mm` with activations scaled per token each call
(kernels/fp8_matmul.py); elsewhere the weight is dequantized to the model's dtype, with a log line.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.distributed.communication import all_reduce
from weir_server.kernels.fp8_matmul import FP8, fp8_matmul, quantize_weight_per_channel, scaled_mm_available
from weir_server.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    WeightSource,
    source_shape,
    swap_linear_layers,
)
from weir_server.models.quant_config import QuantConfig

logger = logging.getLogger(__name__)


def _num_shards(base: Any) -> int:
    if isinstance(base, QKVParallelLinear):
        return 3
    if isinstance(base, MergedColumnParallelLinear):
        return len(base.output_sizes)
    return 1


class Fp8Linear(nn.Module):
    """A column-parallel (incl. fused q/k/v, gate/up) or row-parallel layer over e4m3 weights."""

    _base: Any

    def __init__(self, base: Any, quant: QuantConfig) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)  # not a submodule: its meta weight is never allocated
        self.quantize_on_load = quant.quantize_on_load
        self.tp_size = base.tp_size
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.out_features, self.in_features = base.out_features, base.in_features
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # placeholder: dtype, device, name
        self.scale_names = (
            () if quant.quantize_on_load else ("weight_scale",) + (("input_scale",) if quant.static_input_scale else ())
        )
        for kind in self.scale_names:
            setattr(self, kind, nn.Parameter(torch.empty(0), requires_grad=False))
        self.bias = getattr(base, "bias", None)
        self.num_shards = _num_shards(base)
        self._staging: torch.Tensor | None = None
        self._rows: dict[Any, int] = {}
        self._scales: dict[Any, torch.Tensor] = {}
        self.form: nn.Module | None = None

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Take one part's weight (cut to this rank by the replaced layer's loader) or scale."""
        kind = name.rpartition(".")[2]
        if kind == "input_scale":
            return  # activations are scaled per token at each call (dynamic), as vLLM's default does
        if kind == "weight_scale":
            self._scales[shard_id] = (src if isinstance(src, torch.Tensor) else src[...]).float().reshape(-1)
        elif param is self.weight:
            self._stage_weight(src, name, shard_id)
        else:
            self._base.weight_loader(param, src, name, shard_id)  # the bias
            return
        if len(self._rows) == self.num_shards and (self.quantize_on_load or len(self._scales) == self.num_shards):
            self._finalize(name.rpartition(".")[0])

    def _stage_weight(self, src: WeightSource, name: str, shard_id: Any) -> None:
        dtype = _source_dtype(src)
        is_fp8 = dtype == FP8
        if is_fp8 == self.quantize_on_load:
            what = "float" if self.quantize_on_load else "float8_e4m3fn"
            raise ValueError(f"{name}: weight of dtype {dtype}, expected {what} for this checkpoint's quantization")
        if self._staging is None:
            shape = (self.out_features, self.in_features)
            self._staging = torch.empty(shape, dtype=FP8 if is_fp8 else self.weight.dtype, device=self.weight.device)
        self._base.weight_loader(self._staging, src, name, shard_id)
        self._rows[shard_id] = source_shape(src)[0]

    def _finalize(self, name: str) -> None:
        staging, self._staging = self._staging, None
        assert staging is not None
        if self.quantize_on_load:
            weight, scale = quantize_weight_per_channel(staging)
        else:
            weight, scale = staging, self._channel_scales(name)
        self._rows, self._scales = {}, {}
        device, dtype = self.weight.device, self.weight.dtype
        n, k = weight.shape
        if scaled_mm_available(device) and n % 16 == 0 and k % 16 == 0:
            self.form = ScaledMMWeight(weight, scale)
        else:
            _log_dequantized(device)
            self.form = DenseWeight((weight.float() * scale.view(-1, 1)).to(dtype))

    def _channel_scales(self, name: str) -> torch.Tensor:
        """One float32 scale per local output row, each part's per-tensor or per-channel scales put where the
        replaced layer's loader puts its rows."""
        local = torch.empty((self.out_features, 1), dtype=torch.float32)
        for shard_id, rows in self._rows.items():
            scale = self._scales[shard_id]
            if scale.numel() not in (1, rows):
                raise ValueError(
                    f"{name}.weight_scale: {scale.numel()} values for {rows} output rows; Weir runs per-tensor "
                    "and per-channel FP8 scales"
                )
            full = scale.expand(rows).reshape(rows, 1)
            if self.row_parallel:
                local.copy_(full)
            else:
                self._base.weight_loader(local, full, f"{name}.weight_scale", shard_id)
        return local.view(-1).to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form is None:
            raise RuntimeError(f"{type(self).__name__}: weights not loaded")
        out = self.form(x)
        if self.row_parallel and self.tp_size > 1:
            out = all_reduce(out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, form={type(self.form).__name__}"


def _source_dtype(src: WeightSource) -> torch.dtype:
    """A checkpoint tensor's dtype; a lazy slice's from one row (safetensors' slices name theirs only as strings)."""
    if isinstance(src, torch.Tensor):
        return src.dtype
    sample: torch.Tensor = src[0:1] if source_shape(src) else src[...]  # a lazy slice: one row
    return sample.dtype


class ScaledMMWeight(nn.Module):
    """e4m3 weight [N, K] and float32 per-channel scales, multiplied on FP8 tensor cores."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return fp8_matmul(flat, self.weight, self.weight_scale).reshape(*x.shape[:-1], -1)


class DenseWeight(nn.Module):
    """The dequantized weight in the model's dtype (CPUs and GPUs without FP8 matmuls)."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _log_dequantized(device: torch.device) -> None:
    _log_once(str(device))


@functools.cache
def _log_once(device: str) -> None:
    logger.info(
        "FP8 weights dequantized to the model's dtype: no FP8 matmul on %s (needs compute capability 8.9+)", device
    )


def restore_dequantized_layers(model: nn.Module) -> int:
    """Put the float layers back where FP8 weights were dequantized (no FP8 matmul here): the replaced layer
    class with the dequantized weight, so the CPU's packed matmuls (layers/cpu_linear.py) and LoRA take it as
    they take any float layer. Returns how many were put back."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Fp8Linear) and isinstance(module.form, DenseWeight):
            layer = copy.copy(module._base)
            layer._parameters = {"weight": nn.Parameter(module.form.weight, requires_grad=False), "bias": module.bias}
            layer._buffers, layer._modules = dict(layer._buffers), dict(layer._modules)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, layer)
            count += 1
    return count


def quantize_fp8_layers(model: nn.Module, quant: QuantConfig) -> int:
    """Swap the model's tensor-parallel linear layers (exactly those classes) for Fp8Linear before materializing;
    the embedding and LM head stay in the model's dtype. Returns how many were swapped."""
    return swap_linear_layers(model, lambda layer: Fp8Linear(layer, quant))
