"""Linear, embedding and LM-head layers whose GGUF weights stay quantized in memory.

`quantize_gguf_layers` swaps a model's tensor-parallel layers (still on the meta device) for these before its
weights are loaded. Each keeps the layer it replaces as its loader: to learn which checkpoint rows (or input
columns) land where on this rank, it runs that layer's own `weight_loader` on a column of row numbers, so the
sharding rules live in one place (layers/linear.py). Output rows are independent in GGUF (blocks run along
the input), so column-parallel shards, fused q/k/v and gate/up, and vocabulary shards slice whole rows; a
row-parallel shard slices each row's bytes where its columns start and end on block boundaries, and is
dequantized (with a log line) where they do not. Fused projections may mix types (Q4_K_M files keep v in
Q6_K and q, k in Q4_K): each run of one type is its own part, and the parts' outputs are concatenated.

With `dense_copies` (a one-rank bf16 model on a CPU, by default) a linear layer also keeps its weight dequantized
beside the blocks: steps of a few rows, bound by reading weights, read the blocks, and larger ones multiply the
float copy (oneDNN's packed one once layers/cpu_linear.py swaps the layer), as fast as a dequantizing load.

A `QuantizedTensor` also reads as floats through the lazy-slice interface, so any layer not swapped here
loads it dequantized.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.distributed.communication import all_gather, all_reduce
from weir_server.kernels.gguf_dequant import GGMLType, dequantize, row_bytes
from weir_server.layers.fused_moe import FusedMoE
from weir_server.layers.gguf_weights import (
    INT4_MAX_ROWS,
    DenseRows,
    Int8BlockRows,
    PackedRows,
    PlanesRows,
    RowsForm,
    packed_for_device,
    rows_for_device,
)
from weir_server.layers.linear import (
    LINEAR_TYPES,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    WeightSource,
    read_full,
    read_slice,
    source_shape,
)

logger = logging.getLogger(__name__)


class QuantizedTensor:
    """A GGUF matrix kept packed: raw blocks [rows, row_bytes] (rows in the checkpoint's HF order), its type and
    its [rows, cols] shape. Indexing with slices reads dequantized float32, like a lazy safetensors slice."""

    def __init__(self, raw: torch.Tensor, qtype: GGMLType, cols: int) -> None:
        if raw.dim() != 2 or raw.shape[1] != row_bytes(qtype, cols):
            raise ValueError(f"{qtype.name} tensor of {tuple(raw.shape)} bytes does not hold [{len(raw)}, {cols}]")
        self.raw, self.qtype, self.shape = raw, qtype, (raw.shape[0], cols)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        return dequantize(self.raw[index[0]], self.qtype)[(slice(None), *index[1:])]


class PackedExperts:
    """A GGUF file's stacked experts kept packed: raw blocks [experts, rows, row_bytes] of one type, the matrices'
    [rows, cols]. Indexing with slices reads dequantized float32 (a layer that does not keep them packed, as
    `FusedMoE`'s loader reads any lazy slice)."""

    def __init__(self, raw: torch.Tensor, qtype: GGMLType, cols: int) -> None:
        if raw.dim() != 3 or raw.shape[2] != row_bytes(qtype, cols):
            raise ValueError(f"{qtype.name} experts of {tuple(raw.shape)} bytes do not hold [{len(raw)}, *, {cols}]")
        self.raw, self.qtype, self.shape = raw, qtype, (raw.shape[0], raw.shape[1], cols)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        raw = self.raw[index[:2]]
        rows = dequantize(raw.reshape(-1, raw.shape[-1]), self.qtype).view(*raw.shape[:-1], self.shape[2])
        return rows[(slice(None), slice(None), *index[2:])]


# A shard as it arrives: raw rows with their type, or float rows.
_Entry = tuple[torch.Tensor, GGMLType | None]


class _GGUFRowsLayer(nn.Module):
    """What the GGUF layers share: shards gathered by output row, turned into parts once all have arrived."""

    _base: Any  # the layer replaced (on the meta device): its weight_loader knows the sharding

    def __init__(self, base: Any, out_features: int, in_features: int, dense_copy: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)  # not a submodule: its meta weight is never allocated
        self.tp_rank, self.tp_size = int(getattr(base, "tp_rank", 0)), int(getattr(base, "tp_size", 1))
        self.out_features, self.in_features = out_features, in_features
        # Placeholder: it carries the model's dtype and device through materialization, and the name
        # `...weight` that load_weights looks up.
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.parts = nn.ModuleList()
        self._pending: dict[int, _Entry] = {}
        self.dense_copy = dense_copy
        self.dense_weight: torch.Tensor | None = None  # with dense_copy: [out, in] in the model's dtype

    def _row_map(self, src: WeightSource, name: str, shard_id: Any) -> tuple[int, torch.Tensor]:
        """(first local row, checkpoint row of each local row from there, -1 for vocabulary padding)."""
        rows = source_shape(src)[0]
        probe = torch.full((self.out_features, 1), -1.0, dtype=torch.float64)
        numbers = torch.arange(1, rows + 1, dtype=torch.float64).unsqueeze(1)
        self._base.weight_loader(probe, numbers, name, shard_id)
        filled = (probe[:, 0] != -1).nonzero()[:, 0]
        offset = int(filled[0])
        if not torch.equal(filled, torch.arange(offset, offset + len(filled))):
            raise ValueError(f"{name}: this rank's rows are not one run")
        return offset, probe[filled, 0].long() - 1

    def _gather_rows(self, src: WeightSource, index: torch.Tensor) -> _Entry:
        if isinstance(src, QuantizedTensor):
            table, qtype = src.raw, src.qtype
        else:
            table, qtype = read_full(src), None
        out = table.new_zeros((len(index), table.shape[1]))  # zero bytes dequantize to 0 in every packed type
        valid = index >= 0
        out[valid] = table[index[valid]]
        return out, qtype

    def _add(self, offset: int, entry: _Entry) -> None:
        self._pending[offset] = entry
        if sum(len(rows) for rows, _ in self._pending.values()) == self.out_features:
            runs = self._merge_runs()
            self._pending = {}
            self._finalize(runs)

    def _merge_runs(self) -> list[_Entry]:
        """The shards in row order, neighbours of one type joined (one matmul for fused q/k/v of one type)."""
        runs: list[_Entry] = []
        for offset in sorted(self._pending):
            rows, qtype = self._pending[offset]
            if runs and runs[-1][1] == qtype and (qtype is not None or rows.dtype == runs[-1][0].dtype):
                runs[-1] = (torch.cat((runs[-1][0], rows)), qtype)
            else:
                runs.append((rows, qtype))
        return runs

    def _finalize(self, runs: list[_Entry]) -> None:
        if self.dense_copy:
            self.dense_weight = _dense(runs, self.weight.device, self.weight.dtype)
        self.parts = nn.ModuleList(self._form(rows, qtype) for rows, qtype in runs)

    def _form(self, rows: torch.Tensor, qtype: GGMLType | None, packed_only: bool = False) -> RowsForm:
        device, dtype = self.weight.device, self.weight.dtype
        if qtype is None:
            return DenseRows(rows.to(device, dtype))
        if packed_only:
            return packed_for_device(rows.to(device), qtype, self.in_features)
        return rows_for_device(rows.to(device), qtype, self.in_features, dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parts:
            raise RuntimeError(f"{type(self).__name__}: weights not loaded")
        if self.dense_weight is not None and x.reshape(-1, self.in_features).shape[0] > INT4_MAX_ROWS:
            return F.linear(x, self.dense_weight)
        outs = [cast(RowsForm, part).matmul(x) for part in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        forms = [cast(RowsForm, part) for part in self.parts]
        dense = ", a dense copy for larger steps" if self.dense_weight is not None else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, parts=[{describe_parts(forms)}]{dense}"


def describe_parts(parts: list[RowsForm]) -> str:
    """`Int4Rows(Q4_K, 1024), Int8BlockRows(Q6_K, 128)`: each part's form, type and rows."""
    return ", ".join(f"{type(p).__name__}({getattr(p, 'qtype', None) or 'float'}, {p.rows})" for p in parts)


def _dense(runs: list[_Entry], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The runs' rows dequantized (the file's values, rounded once to `dtype`), one [rows, cols] matrix."""
    return torch.cat([(rows if qtype is None else dequantize(rows, qtype)).to(device, dtype) for rows, qtype in runs])


class GGUFLinear(_GGUFRowsLayer):
    """A column-parallel (incl. fused q/k/v, gate/up), row-parallel or LM-head layer over GGUF weights."""

    def __init__(self, base: Any, dense_copy: bool = False) -> None:
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.lm_head = isinstance(base, ParallelLMHead)
        if self.lm_head:
            out_features, in_features = base.num_embeddings, base.embedding_dim
        else:
            out_features, in_features = base.out_features, base.in_features
        super().__init__(base, out_features, in_features, dense_copy)
        self.full_in = int(getattr(base, "full_input_size", in_features))
        self.full_num_embeddings = int(getattr(base, "full_num_embeddings", out_features))
        self.bias = getattr(base, "bias", None)

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Take this rank's part of a checkpoint weight (a QuantizedTensor stays packed) or of the bias."""
        if param is not self.weight:
            self._base.weight_loader(param, src, name, shard_id)
            return
        shape = source_shape(src)
        if len(shape) != 2 or shape[1] != self.full_in:
            expected = (shape[0], self.full_in) if len(shape) == 2 else (self.full_in,)
            raise ValueError(f"{name}: checkpoint shape {tuple(shape)} != model {expected}")
        if self.row_parallel:
            self._add(0, self._column_slice(src, name, shard_id))
        else:
            offset, index = self._row_map(src, name, shard_id)
            self._add(offset, self._gather_rows(src, index))

    def _column_slice(self, src: WeightSource, name: str, shard_id: Any) -> _Entry:
        """This rank's input columns of a row-parallel weight: byte ranges of whole blocks, else floats."""
        rows = source_shape(src)[0]
        if rows != self.out_features:
            shape = tuple(source_shape(src))
            raise ValueError(f"{name}: checkpoint shape {shape} != model {(self.out_features, self.full_in)}")
        start, length = self.tp_rank * self.in_features, self.in_features
        if isinstance(src, QuantizedTensor):
            qtype = src.qtype
            if start % qtype.block_size == 0 and length % qtype.block_size == 0:
                first = start // qtype.block_size * qtype.type_size
                return src.raw[:, first : first + row_bytes(qtype, length)], qtype
            logger.info(
                "%s: %d input columns per rank cut through %s blocks of %d; dequantizing this shard",
                name,
                length,
                qtype.name,
                qtype.block_size,
            )
        return read_slice(src, 1, start, length), None

    def _finalize(self, runs: list[_Entry]) -> None:
        super()._finalize(runs)
        for part in self.parts:  # a tied embedding looks its rows up in the op's layout
            if isinstance(part, Int8BlockRows):
                part.drop_plain_rows()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x)
        if self.row_parallel and self.tp_size > 1:
            out = all_reduce(out)
        return out if self.bias is None else out + self.bias

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] (the LM head's contract)."""
        logits = self._matmul(hidden)
        if self.tp_size == 1:
            return logits
        return all_gather(logits)[..., : self.full_num_embeddings]


class GGUFEmbedding(_GGUFRowsLayer):
    """A vocabulary-parallel embedding over GGUF rows: a lookup dequantizes only the rows it gathers. A tied
    LM head gets its own matmul form of the same rows once they are loaded."""

    tied_head: GGUFLinear | None

    def __init__(self, base: VocabParallelEmbedding, dense_copy: bool = False) -> None:
        super().__init__(base, base.num_embeddings, base.embedding_dim, dense_copy)
        self.vocab_start, self.num_valid = base.vocab_start, base.num_valid
        object.__setattr__(self, "tied_head", None)  # set by quantize_gguf_layers; not a submodule here

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Take this rank's vocabulary rows (padding rows are zero)."""
        offset, index = self._row_map(src, name, shard_id)
        self._add(offset, self._gather_rows(src, index))

    def _finalize(self, runs: list[_Entry]) -> None:
        runs = [(rows.to(self.weight.device), qtype) for rows, qtype in runs]  # a tied head shares these bytes
        if self.tied_head is not None:
            self.tied_head._finalize(runs)
            if all(hasattr(part, "dequantize_rows") for part in self.tied_head.parts):
                self.parts = self.tied_head.parts  # look up in the head's form: one copy of the matrix
                return
        if self.dense_copy:  # lookups read float rows, as a dequantizing load's do: a tied head's own copy
            dense = None if self.tied_head is None else self.tied_head.dense_weight
            if dense is None:
                dense = _dense(runs, self.weight.device, self.weight.dtype)
            self.parts = nn.ModuleList([DenseRows(dense)])
            return
        self.parts = nn.ModuleList(self._form(rows, qtype, packed_only=True) for rows, qtype in runs)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        (part,) = self.parts
        if isinstance(part, PackedRows | PlanesRows | Int8BlockRows):
            return part.dequantize_rows(ids).to(self.weight.dtype)
        assert isinstance(part, DenseRows)
        return F.embedding(ids, part.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_valid)
        out = self._lookup(local.masked_fill(outside, 0))
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


def quantize_gguf_layers(model: nn.Module, dense_copies: bool = False) -> int:
    """Swap the model's tensor-parallel linear, embedding and LM-head layers and its routed experts (exactly those
    classes: a family's own subclass keeps its float path) for GGUF ones, before materializing. Returns how many
    were swapped. With `dense_copies` the layers keep dequantized weights beside the blocks, and experts are left
    to load dequantized."""
    embeddings: dict[int, GGUFEmbedding] = {}
    count = 0
    for name, module in list(model.named_modules()):
        owner_name, _, attr = name.rpartition(".")
        swapped: nn.Module
        if type(module) in LINEAR_TYPES:
            swapped = GGUFLinear(module, dense_copies)
        elif type(module) is VocabParallelEmbedding:
            swapped = embeddings[id(module.weight)] = GGUFEmbedding(module, dense_copies)
        elif type(module) is FusedMoE and not dense_copies:
            from weir_server.layers.gguf_moe import GGUFFusedMoE  # it builds on this module's PackedExperts

            swapped = GGUFFusedMoE(module)
        elif type(module) is ParallelLMHead:
            swapped = GGUFLinear(module, dense_copies)
            tied = embeddings.get(id(module.weight))
            if tied is not None:
                object.__setattr__(tied, "tied_head", swapped)
                swapped.weight = tied.weight  # one placeholder: the loader's tie and missing-tensor checks hold
        else:
            continue
        setattr(model.get_submodule(owner_name), attr, swapped)
        count += 1
    return count
