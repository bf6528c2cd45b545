"""Phi-3 and Phi-4-mini: the Llama decoder, with q/k/v and gate/up stored fused in the checkpoint.

What else sets them apart is read from the config by the shared layers: LongRoPE scaling, partial rotary
(Phi-4-mini turns 3/4 of each head), the sliding window of the 4k models, tied embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from weir_server.layers.linear import WeightSource, read_full, source_shape
from weir_server.models.llama import LlamaForCausalLM, head_dim_of


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's modules; the checkpoint's fused qkv_proj and gate_up_proj are cut into the q/k/v and gate/up
    parts that our tensor-parallel layers take, so each rank still copies only its own heads and columns."""

    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> None:
        """Copy Hugging Face-named Phi-3 tensors in; raise if any parameter stays unset."""
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, WeightSource]]) -> Iterator[tuple[str, WeightSource]]:
        config = self.config
        head_dim = head_dim_of(config)
        q_size = config.num_attention_heads * head_dim
        kv_size = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
        parts = {
            ".qkv_proj.": ((".q_proj.", q_size), (".k_proj.", kv_size), (".v_proj.", kv_size)),
            ".gate_up_proj.": ((".gate_proj.", config.intermediate_size), (".up_proj.", config.intermediate_size)),
        }
        for name, tensor in weights:
            fused = next((fragment for fragment in parts if fragment in name), None)
            if fused is None:
                yield name, tensor
                continue
            expected = sum(size for _, size in parts[fused])
            if name.rpartition(".")[2] in _QUANTIZED_KINDS:  # AWQ / GPTQ / FP8 tensors: cut where their outputs lie
                yield from _unfused_quantized(name, tensor, fused, parts[fused], expected)
                continue
            if source_shape(tensor)[0] != expected:
                raise ValueError(
                    f"{name}: checkpoint has {source_shape(tensor)[0]} rows, the config implies {expected}"
                )
            start = 0
            for fragment, size in parts[fused]:
                yield name.replace(fused, fragment), _rows(tensor, start, size)
                start += size


# Quantized checkpoints' tensors of a projection besides `weight` (layers/int4_checkpoint.py, layers/fp8_linear.py).
_QUANTIZED_KINDS = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "input_scale")


def _unfused_quantized(
    name: str, src: WeightSource, fused: str, parts: tuple[tuple[str, int], ...], expected: int
) -> Iterator[tuple[str, WeightSource]]:
    """A fused projection's quantized tensor cut per part: along the output columns (dim 1, eight to an int32 where
    packed) for AWQ/GPTQ qweight, qzeros and scales, along the rows for a per-channel FP8 weight_scale; whole for
    what every part shares (g_idx: one input, so one act-order; per-tensor scales)."""
    tensor = read_full(src) if source_shape(src) else src[...]
    kind = name.rpartition(".")[2]
    if kind in ("weight_scale", "input_scale"):
        dim, pack = (0, 1) if tensor.numel() == expected else (-1, 1)  # per channel, or per tensor
    elif kind == "g_idx":
        dim, pack = -1, 1
    elif tensor.dim() == 2 and expected in (tensor.shape[1], tensor.shape[1] * 8):
        dim, pack = 1, expected // tensor.shape[1]
    else:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} has no {expected} output columns")
    start = 0
    for fragment, size in parts:
        part = tensor if dim < 0 else tensor.narrow(dim, start // pack, size // pack)
        yield name.replace(fused, fragment), part
        start += size


def _rows(src: WeightSource, start: int, length: int) -> WeightSource:
    """Rows start:start+length of a checkpoint tensor, or a lazy slice of them that still reads on demand."""
    if hasattr(src, "narrow"):
        return src.narrow(0, start, length)
    return _LazyRows(src, start, length)


class _LazyRows:
    """A row range of a lazy safetensors slice with the slice's own interface (`get_shape()`, indexing)."""

    def __init__(self, src: Any, start: int, length: int) -> None:
        self.src, self.start, self.length = src, start, length

    def get_shape(self) -> list[int]:
        return [self.length, *source_shape(self.src)[1:]]

    def __getitem__(self, index: Any) -> Any:
        index = index if isinstance(index, tuple) else (index,)
        rows, rest = index[0], index[1:]
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            return read_full(self)[index]
        first, last, _ = rows.indices(self.length)
        return self.src[(slice(self.start + first, self.start + last), *rest)]
