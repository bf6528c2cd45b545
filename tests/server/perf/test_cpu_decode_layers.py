"""Decode steps through `decode_layers` (every layer in one C++ call) give the module path's bits."""

from __future__ import annotations

import pytest
import torch
from test_cpu_fast_paths import BLOCK_SIZE, q4_grid_weight, tiny_llama

from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.cpu_linear import int4_available, pack_linear_layers, packing_available

pytestmark = pytest.mark.skipif(
    cpu_ops() is None or not packing_available() or not int4_available(), reason="needs the C++ ops and oneDNN"
)


def q4_llama():
    """The two-layer tiny Llama in bf16 with every projection on the 4-bit grid, packed."""
    model = tiny_llama(torch.bfloat16, tied=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.copy_(q4_grid_weight(*param.shape))
    assert pack_linear_layers(model) > 0
    return model


def step(model, caches, tokens: list[int], start: int) -> torch.Tensor:
    """hidden states of `tokens` at positions start.. of one sequence (its blocks 0, 1, ... in order)."""
    end = start + len(tokens)
    blocks = -(-end // BLOCK_SIZE)
    attn = AttentionMetadata(
        slot_mapping=torch.arange(start, end),
        block_tables=torch.arange(blocks, dtype=torch.int32).unsqueeze(0),
        context_lens=torch.tensor([end], dtype=torch.int32),
        query_start_loc=torch.tensor([0, len(tokens)], dtype=torch.int32),
        max_query_len=len(tokens),
        max_context_len=end,
        block_size=BLOCK_SIZE,
        query_lens_cpu=[len(tokens)],
        context_lens_cpu=[end],
    )
    with torch.inference_mode():
        return model(torch.tensor(tokens), torch.arange(start, end), caches, attn)


def test_decode_steps_through_one_call_equal_the_module_path_bit_for_bit():
    model = q4_llama()
    assert model.prepare_cpu_decode()
    plan = model.model.cpu_decode
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (2, 4, BLOCK_SIZE, config.num_key_value_heads, head_dim)
    caches = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(config.num_hidden_layers)]
    step(model, caches, [5, 9, 2, 7, 1, 3], 0)  # a prefill: the module path either way
    position = 6
    for tokens in ([11], [12], [13, 14, 15], [16]):  # decodes and a verify-like step of three tokens
        theirs = [cache.clone() for cache in caches]
        model.model.cpu_decode = None
        expected = step(model, theirs, tokens, position)
        model.model.cpu_decode = plan
        got = step(model, caches, tokens, position)
        assert torch.equal(got, expected)
        assert all(torch.equal(a, b) for a, b in zip(caches, theirs, strict=True))  # the same K/V written
        position += len(tokens)


def test_models_the_call_does_not_cover_keep_the_module_path():
    plain = tiny_llama(torch.bfloat16, tied=False)  # ordinary bf16 weights: no 4-bit copies
    pack_linear_layers(plain)
    assert not plain.prepare_cpu_decode()
    model = q4_llama()
    model.model.layers[1].self_attn.o_proj.bias = torch.zeros(64, dtype=torch.bfloat16)  # a bias it does not add
    assert not model.prepare_cpu_decode()
