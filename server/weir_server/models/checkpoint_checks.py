"""Checks of checkpoint files before their tensors are read, so that a damaged or unreadable file fails the load with
one line naming the file and the tensor: a truncated safetensors or GGUF file, a GGUF quantization type that cannot
be dequantized, a GGUF tensor with no place in the model."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from torch import nn

from weir_server.errors import ModelLoadError

# Tensors llama.cpp writes that are recomputed from the config (RoPE frequency tables); transformers skips them.
_DERIVED_GGUF_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})


def check_safetensors_file(path: Path) -> None:
    """Raise ModelLoadError unless the header is whole JSON and every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if len(prefix) < 8 or 8 + header_len > size:
            raise ModelLoadError(f"{path}: truncated: {size} bytes, shorter than its safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as error:  # bad JSON or bad UTF-8
            raise ModelLoadError(f"{path}: not a safetensors file: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file: its header is not a JSON object")
    for name, info in header.items():
        end = _safetensors_end(info)
        if name != "__metadata__" and end is not None and 8 + header_len + end > size:
            raise ModelLoadError(
                f"{path}: truncated: tensor {name!r} ends at byte {8 + header_len + end}, the file has {size} bytes"
            )


def _safetensors_end(info: Any) -> int | None:
    try:
        return int(info["data_offsets"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None  # malformed entries are safetensors' own to report


def open_gguf(path: Path) -> Any:
    """The file's GGUFReader; ModelLoadError naming the file (and the first tensor cut off) if it cannot be read,
    or naming a tensor whose quantization type cannot be dequantized."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as error:
        cut = _first_cut_gguf_tensor(path)
        if cut is not None:
            raise ModelLoadError(f"{path}: truncated: {cut}") from error
        raise ModelLoadError(f"{path}: not a readable GGUF file: {error}") from error
    for tensor in reader.tensors:
        if not _dequantizes(tensor.tensor_type):
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} has GGUF type {tensor.tensor_type.name}, which cannot be "
                f"dequantized; supported types: {', '.join(supported_gguf_types())}"
            )
    return reader


def supported_gguf_types() -> list[str]:
    """The GGUF tensor types the installed `gguf` package dequantizes (what transformers' GGUF reader uses)."""
    from gguf import GGMLQuantizationType

    return [qtype.name for qtype in GGMLQuantizationType if _dequantizes(qtype)]


@functools.cache
def _dequantizes(qtype: Any) -> bool:
    # Asked of the package itself, one block of zeros per type: its list of types grows with its versions.
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def check_gguf_tensors(reader: Any, path: Path, name_model: nn.Module) -> None:
    """Raise ModelLoadError for a tensor transformers' GGUF name map has no place for (it would drop it silently)
    or whose size differs from its place's.

    `name_model` is the weightless transformers model whose state dict the map is built from.
    """
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)()
    mapping = get_gguf_hf_weights_map(name_model, processor)
    places = name_model.state_dict()
    for tensor in reader.tensors:
        name = tensor.name
        # Merged MoE expert tensors are mapped without their `.weight` suffix.
        if name.rpartition(".")[0] in mapping or name in _DERIVED_GGUF_TENSORS:
            continue
        if name not in mapping:
            raise ModelLoadError(f"{path}: tensor {name!r} has no place in a GGUF {architecture!r} model")
        place = places.get(mapping[name])
        if place is not None and place.numel() != int(tensor.n_elements):
            shape = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF lists dims innermost first
            expected = tuple(place.shape)
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {shape}, but {mapping[name]!r} is {expected}")


def _first_cut_gguf_tensor(path: Path) -> str | None:
    """Which tensor's bytes run past the end of a short GGUF file, read from its tensor table; None if the table
    itself is unreadable or no tensor is cut."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class TableReader(GGUFReader):
        """Reads the header and tensor table only; the data may be cut short."""

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            self.table = []
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_dtype[0])]
                elements = 1
                for dim in dims.tolist():
                    elements *= int(dim)
                end = start_offs + int(offset[0]) + elements * type_size // block_size
                self.table.append((bytes(name).decode("utf-8", "replace"), end))

    size = path.stat().st_size
    try:
        table = TableReader(path).table
    except Exception:  # noqa: BLE001 - only a better message is at stake; the caller reports the original error
        return None
    for name, end in table:
        if end > size:
            return f"tensor {name!r} ends at byte {end}, the file has {size} bytes"
    return None
