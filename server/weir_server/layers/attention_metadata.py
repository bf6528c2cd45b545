"""What a model's attention layers need to know about the batch: which cache slots, which blocks, how long.

A step runs a flattened batch of T query tokens from B sequences (prefill chunks and decodes mixed).
Sequence i owns query tokens query_start_loc[i]:query_start_loc[i+1], which are the last
query_lens[i] tokens of its context of context_lens[i] tokens (cached tokens + this step's tokens).
The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Per-step batch layout shared by every attention layer of a model."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) for each query token's K/V
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [B] int32: tokens in each sequence's context after this step
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative query lengths
    max_query_len: int
    max_context_len: int
    block_size: int
    # Host copies, so kernels and the torch path can size things without a device sync.
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]
    # What the torch attention path derives from the above (gather indices, masks), built by the first layer of
    # a step and reused by the others.
    derived: dict[object, torch.Tensor | int | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
