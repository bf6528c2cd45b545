"""Tensor-parallel linear and embedding layers (Megatron-style), each a plain nn.Linear/nn.Embedding at size 1.

Column-parallel layers split their output features over the ranks and need no communication; row-parallel
layers split their input features and all-reduce the partial sums. Attention heads and MLP columns are split
by a column-parallel layer followed by a row-parallel one, so each block costs one all-reduce.

Every layer shards its weights while loading: `weight_loader` takes the full checkpoint tensor, or a lazy
safetensors slice so that a rank reads only its own rows from disk, and copies this rank's part.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weir_server.distributed import parallel_state
from weir_server.distributed.communication import all_gather, all_reduce
from weir_server.distributed.parallel_state import divide, kv_heads_per_rank

# A checkpoint tensor, or a lazy safetensors slice (`get_shape()`, indexed with slices) that reads on demand.
WeightSource = Any


def source_shape(src: WeightSource) -> tuple[int, ...]:
    """The full shape of a checkpoint tensor or lazy slice."""
    return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())


def read_slice(src: WeightSource, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows start:start+length of `src` along `dim`; a lazy slice reads only those from disk."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, length)
    index = [slice(None)] * len(src.get_shape())
    index[dim] = slice(start, start + length)
    return src[tuple(index)]  # type: ignore[no-any-return]


def read_full(src: WeightSource) -> torch.Tensor:
    """The whole tensor."""
    return src if isinstance(src, torch.Tensor) else src[:]


def load_replicated(param: torch.Tensor, src: WeightSource, name: str) -> None:
    """Copy a tensor every rank holds whole (norms, biases of row-parallel layers)."""
    check_shape(src, tuple(param.shape), name)
    with torch.no_grad():
        param.copy_(read_full(src))


def check_shape(src: WeightSource, expected: tuple[int, ...], name: str) -> None:
    """ValueError naming the tensor unless the checkpoint's shape is the model's."""
    shape = source_shape(src)
    if shape != expected:
        raise ValueError(f"{name}: checkpoint shape {shape} != model {expected}")


def _copy(target: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(src)


class ColumnParallelLinear(nn.Linear):
    """y = x W^T + b with W's output rows split over the ranks; each rank returns its slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        self.tp_rank, self.tp_size = parallel_state.tp_rank(), parallel_state.tp_size()
        self.full_output_size = output_size
        super().__init__(input_size, divide(output_size, self.tp_size, "the output features"), bias=bias)

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Copy this rank's rows of the full [out, in] weight (or [out] bias)."""
        check_shape(src, (self.full_output_size, *param.shape[1:]), name)
        rows = param.shape[0]
        _copy(param, read_slice(src, 0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate and up); each is split per rank."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        tp = parallel_state.tp_size()
        self.output_sizes = list(output_sizes)
        self.local_sizes = [divide(size, tp, "the output features") for size in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias=bias)

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Copy this rank's rows of projection `shard_id` (an index into output_sizes) into its place."""
        index = int(shard_id)
        check_shape(src, (self.output_sizes[index], *param.shape[1:]), name)
        size = self.local_sizes[index]
        target = param.narrow(0, sum(self.local_sizes[:index]), size)
        _copy(target, read_slice(src, 0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; each rank gets whole query heads and whole KV heads (replicated if too few)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp = parallel_state.tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, tp, "the number of attention heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp)
        # Ranks that share a replicated KV head: rank r holds KV head r // replicas.
        self.kv_replicas = max(1, tp // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        full = (num_heads + 2 * self.num_kv_heads * tp) * head_dim  # what the local slices add up to
        super().__init__(hidden_size, full, bias=bias)

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Copy this rank's heads of the q, k or v checkpoint tensor into their place."""
        if shard_id == "q":
            total, size, offset = self.total_num_heads * self.head_dim, self.q_size, 0
            start = self.tp_rank * size
        elif shard_id in ("k", "v"):
            total, size = self.total_num_kv_heads * self.head_dim, self.kv_size
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            start = (self.tp_rank // self.kv_replicas) * size
        else:
            raise ValueError(f"{name}: unknown q/k/v shard {shard_id!r}")
        check_shape(src, (total, *param.shape[1:]), name)
        _copy(param.narrow(0, offset, size), read_slice(src, 0, start, size))


class RowParallelLinear(nn.Linear):
    """y = x W^T + b with W's input columns split over the ranks: partial products are summed by all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        self.tp_rank, self.tp_size = parallel_state.tp_rank(), parallel_state.tp_size()
        self.full_input_size = input_size
        super().__init__(divide(input_size, self.tp_size, "the input features"), output_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias  # added once, after the sum

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Copy this rank's input columns of the weight; the bias is whole on every rank."""
        if param.dim() == 1:
            load_replicated(param, src, name)
            return
        check_shape(src, (param.shape[0], self.full_input_size), name)
        cols = param.shape[1]
        _copy(param, read_slice(src, 1, self.tp_rank * cols, cols))


class VocabParallelEmbedding(nn.Embedding):
    """Embedding rows split over the ranks (the last rank's part padded); a token's row comes from its owner."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        self.tp_rank, self.tp_size = parallel_state.tp_rank(), parallel_state.tp_size()
        self.full_num_embeddings = num_embeddings
        per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * per_rank
        self.num_valid = max(0, min(per_rank, num_embeddings - self.vocab_start))
        super().__init__(per_rank, embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_valid)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def weight_loader(self, param: torch.Tensor, src: WeightSource, name: str, shard_id: Any = None) -> None:
        """Copy this rank's vocabulary rows; padding rows are zero."""
        check_shape(src, (self.full_num_embeddings, param.shape[1]), name)
        with torch.no_grad():
            param[self.num_valid :].zero_()
            param[: self.num_valid].copy_(read_slice(src, 0, self.vocab_start, self.num_valid))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocabulary split like the embedding; logits are gathered so every rank has all."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype."""
        logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        return all_gather(logits)[..., : self.full_num_embeddings]


# The dense tensor-parallel projections a quantized checkpoint replaces (exactly these classes: a family's own
# subclass keeps its float path).
LINEAR_TYPES = (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear)


def swap_linear_layers(model: nn.Module, make: Any) -> int:
    """Replace each of the model's LINEAR_TYPES layers by `make(layer)` (before materializing); how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) in LINEAR_TYPES:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, make(module))
            count += 1
    return count
