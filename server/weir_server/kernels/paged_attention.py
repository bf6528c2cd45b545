"""The CUDA backend of layers/attention.py: one call per layer, decode or (mixed) prefill kernel by batch."""

import torch

from weir_server.kernels import HAS_TRITON
from weir_server.kernels.decode_attention import decode_attention
from weir_server.kernels.prefill_attention import prefill_attention
from weir_server.layers.attention_metadata import AttentionMetadata

__all__ = ["HAS_TRITON", "paged_attention"]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """query [T, H, D], caches [num_blocks, block_size, Hkv, D] -> [T, H, D]; needs Triton (see HAS_TRITON).

    Decode-only batches take the split-K decode kernel, sized by attn.max_context_len (a bound: under CUDA
    graphs give the capture-time maximum for speed; a smaller one is still correct). Anything else,
    mixed decode rows included, takes the chunked-prefill kernel.
    """
    if attn.is_decode_only:
        return decode_attention(
            query,
            key_cache,
            value_cache,
            attn.block_tables,
            attn.context_lens,
            scale,
            sliding_window,
            attn.max_context_len,
            logit_softcap=logit_softcap,
        )
    return prefill_attention(
        query,
        key_cache,
        value_cache,
        attn.block_tables,
        attn.context_lens,
        attn.query_start_loc,
        attn.max_query_len,
        scale,
        sliding_window,
        logit_softcap=logit_softcap,
    )
