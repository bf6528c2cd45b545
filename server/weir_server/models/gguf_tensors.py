"""GGUF tensors under Hugging Face names, the packed types left packed.

transformers' GGUF reader dequantizes every tensor; this walks the same steps (its name map and its
per-architecture processors) but yields a 2-D tensor of a type Weir has kernels for as a `QuantizedTensor`.
A processor that only reorders rows (Llama's q/k un-permutation) is applied to the packed rows: it is run
on a column of row numbers, and the rows are gathered in the order it returns. Anything else, and every
other type, is dequantized as transformers does it, with one log line per type that has no kernel.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from weir_server.kernels.gguf_dequant import INT8_TYPES, PACKED_TYPES, GGMLType
from weir_server.layers.quantized_linear import PackedExperts, QuantizedTensor

logger = logging.getLogger(__name__)

_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


# GGUF metadata keys (after "{architecture}.") that transformers' GGUF config reader drops for these model types, and
# the config fields they set: without them a MoE file whose experts are not the config class's default size fails
# to load (transformers itself refuses such a file).
_MOE_METADATA = {
    "qwen2_moe": {"expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}  # fmt: skip
# llama.cpp renormalizes the top-k routing weights of these architectures whatever the file says (Qwen3-MoE's
# checkpoints set norm_topk_prob; its config class defaults to False).
_RENORMALIZED_ROUTING = ("qwen3_moe",)


def gguf_config_fixes(reader: Any, hf_config: PretrainedConfig) -> dict[str, Any]:
    """Config fields the file's metadata sets that transformers' GGUF config reader leaves at the class defaults."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    model_type = getattr(hf_config, "model_type", "")
    fixes: dict[str, Any] = {}
    if model_type in _RENORMALIZED_ROUTING:
        fixes["norm_topk_prob"] = True
    keys = _MOE_METADATA.get(model_type, {})
    if keys:
        architecture = read_field(reader, "general.architecture")[0]
        for key, field in keys.items():
            value = read_field(reader, f"{architecture}.{key}")
            if value:
                fixes[field] = int(value[0])
    return fixes


def iter_gguf_tensors(
    reader: Any, name_model: nn.Module, hf_config: PretrainedConfig, keep_packed: bool = True
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor | PackedExperts]]:
    """(HF name, tensor) for every tensor of the file (`reader`, a gguf.GGUFReader) that `name_model` (a
    weightless transformers model of the file's config, `hf_config`) has a place for; without `keep_packed`
    every tensor comes dequantized.

    One tensor at a time: transformers' own reader dequantizes the whole file to fp32 before the first is
    copied into the model, which made the load the server's peak memory (SmolLM2-135M: 1.47 GiB, 0.7 above
    its steady state)."""
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    architecture = read_field(reader, "general.architecture")[0]
    # The processors read the HF config keys (head counts) that transformers derived from the same metadata.
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config.to_dict())
    mapping = get_gguf_hf_weights_map(name_model, processor)
    parsed: dict[str, Any] = {"tensors": {}}  # where the MoE processors put the experts they split or stack
    dequantized_types: set[str] = set()

    def process(weights: np.ndarray, name: str) -> Any:
        return processor.process(weights=weights, name=name, tensor_key_mapping=mapping, parsed_parameters=parsed)

    for tensor in reader.tensors:
        qtype = PACKED_TYPES.get(int(tensor.tensor_type)) if keep_packed else None
        if qtype is not None and len(tensor.shape) == 3 and (experts := _packed_experts_name(tensor.name, mapping)):
            cols, rows, count = (int(n) for n in tensor.shape)
            raw = torch.from_numpy(np.array(tensor.data).reshape(count, rows, -1))  # a copy: off the memory map
            yield experts, PackedExperts(raw, qtype, cols)
            continue
        if qtype is not None and len(tensor.shape) == 2:
            cols, rows = (int(n) for n in tensor.shape)  # GGUF lists the fastest dimension first
            result = process(np.arange(rows, dtype=np.float64).reshape(rows, 1), tensor.name)
            if result.name in mapping and result.weights is not None and result.weights.shape == (rows, 1):
                order = torch.from_numpy(result.weights[:, 0].astype(np.int64))
                raw = torch.from_numpy(np.asarray(tensor.data).reshape(rows, -1)[order.numpy()])
                yield mapping[result.name], QuantizedTensor(raw, qtype, cols)
                continue
        type_name = tensor.tensor_type.name
        if keep_packed and type_name not in _FLOAT_TYPES and type_name not in dequantized_types:
            dequantized_types.add(type_name)
            logger.info(
                "GGUF type %s has no kernel in Weir (or not in this layout): dequantizing it at load", type_name
            )
        result = process(dequantize(tensor.data, tensor.tensor_type), tensor.name)
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(np.copy(result.weights))
    for name, stacked in parsed["tensors"].items():  # complete only now: experts arrive one tensor at a time
        yield name, torch.as_tensor(stacked)


_EXPERTS_TENSOR = re.compile(r"(blk\.\d+\.ffn_(gate|up|down)_exps)\.weight")


def _packed_experts_name(gguf_name: str, mapping: dict[str, str]) -> str | None:
    """The HF-style name a stacked expert tensor keeps packed goes under (models/mixtral.py's stacked names, gate and
    up apart), or None where transformers' map has no place for it (it is then dequantized like any tensor)."""
    match = _EXPERTS_TENSOR.fullmatch(gguf_name)
    hf_name = mapping.get(match.group(1)) if match is not None else None
    if match is None or hf_name is None:
        return None
    which = match.group(2)
    if which == "down":
        return hf_name if hf_name.endswith(".experts.down_proj") else None
    stem = hf_name.removesuffix(".experts.gate_up_proj")
    return f"{stem}.experts.{which}_proj" if stem != hf_name else None


def int8_head_rows(reader: Any, tied: bool) -> tuple[torch.Tensor, GGMLType] | None:
    """The LM head's raw rows [vocab, row_bytes] where the file stores them as Q8_0, Q6_K or Q5_K (the output
    tensor, or the token embedding of a tied model), else None. A dequantized model keeps them for few-row
    steps, where the C++ op reads these bytes (about a quarter of bf16's for Q8_0) instead of the bf16 copy."""
    wanted = "token_embd.weight" if tied else "output.weight"
    for tensor in reader.tensors:
        if tensor.name == wanted and len(tensor.shape) == 2 and int(tensor.tensor_type) in INT8_TYPES:
            rows = int(tensor.shape[1])
            raw = np.array(tensor.data).reshape(rows, -1)  # a copy: torch warns on the read-only memory map
            return torch.from_numpy(raw), PACKED_TYPES[int(tensor.tensor_type)]
    return None
