"""The CPU fast paths (bf16 default, oneDNN-packed linears, fused norm and RoPE) compute what the plain paths do."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig

from weir_server.executor.model_runner import physical_cores
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.cpu_linear import (
    INT4_MAX_ROWS,
    PackedGateUpSilu,
    PackedLinear,
    int4_available,
    lossless_int4,
    pack_linear_layers,
    packing_available,
)
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import StepRope, apply_rotary
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import cpu_has_fast_bf16, resolve_dtype

BLOCK_SIZE = 4
PROMPT = [5, 17, 33, 9, 100, 40, 41, 42, 7, 8, 9, 120, 3, 77, 111, 11, 64, 2, 90]

needs_packing = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")


def tiny_llama(dtype: torch.dtype, tied: bool) -> LlamaForCausalLM:
    """A two-layer random Llama in `dtype`, the same weights for every dtype."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) * 0.1 if param.dim() > 1 else 1 + 0.1 * torch.randn(param.shape))
    return model.to(dtype).eval()


def prompt_logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """float32 logits [len(tokens), vocab] of one sequence prefilled into a fresh paged cache."""
    config = model.config
    num_blocks = -(-len(tokens) // BLOCK_SIZE)
    dtype = model.model.embed_tokens.weight.dtype
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (2, num_blocks, BLOCK_SIZE, config.num_key_value_heads, head_dim)
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
    attn = AttentionMetadata(
        slot_mapping=torch.arange(len(tokens)),
        block_tables=torch.arange(num_blocks, dtype=torch.int32).unsqueeze(0),
        context_lens=torch.tensor([len(tokens)], dtype=torch.int32),
        query_start_loc=torch.tensor([0, len(tokens)], dtype=torch.int32),
        max_query_len=len(tokens),
        max_context_len=len(tokens),
        block_size=BLOCK_SIZE,
        query_lens_cpu=[len(tokens)],
        context_lens_cpu=[len(tokens)],
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), caches, attn)
        return model.compute_logits(hidden)


def test_auto_dtype_is_bfloat16_for_generation_only_where_the_cpu_has_native_bf16():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", cpu, "generate") == expected
    assert resolve_dtype("auto", cpu, "embed") == torch.float32
    assert resolve_dtype("float32", cpu, "generate") == torch.float32


@needs_packing
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_packed_model_is_as_close_to_fp32_as_the_plain_bf16_model(tied):
    reference = prompt_logits(tiny_llama(torch.float32, tied), PROMPT)
    model = tiny_llama(torch.bfloat16, tied)
    plain_error = (prompt_logits(model, PROMPT) - reference).abs().max()
    assert pack_linear_layers(model) == 2 * 4 + 1  # per layer qkv, o, gate/up with silu, down; then the head
    packed_error = (prompt_logits(model, PROMPT) - reference).abs().max()
    assert packed_error <= 2 * plain_error + 1e-2


@needs_packing
def test_packing_swaps_linears_and_fuses_the_gated_activation():
    model = tiny_llama(torch.bfloat16, tied=True)
    pack_linear_layers(model)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, PackedLinear)
    assert isinstance(layer.mlp.down_proj, PackedLinear)
    assert isinstance(layer.mlp.gate_up_proj, PackedGateUpSilu)
    assert isinstance(layer.mlp.act_fn, torch.nn.Identity)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the embedding keeps its plain weight


def q4_grid_weight(rows: int, cols: int) -> torch.Tensor:
    """A bf16 weight as a dequantized Q4_1 tensor: per 32 inputs, scale * q + min, where the group's smallest
    weight has q = 0 and its largest q = 15 (as Q4_1's quantizer makes them)."""
    torch.manual_seed(3)
    scale = torch.rand(rows, cols // 32, 1) * 0.02 + 0.001
    low = -scale * torch.randint(4, 12, (rows, cols // 32, 1))
    q = torch.randint(0, 16, (rows, cols // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    return (scale * q + low).reshape(rows, cols).bfloat16()


@pytest.mark.skipif(not int4_available(), reason="this torch build has no CPU int4 matmul")
def test_a_4bit_copy_is_kept_only_where_it_reproduces_the_weights():
    assert lossless_int4(q4_grid_weight(64, 96)) is not None
    assert lossless_int4((torch.randn(64, 96) * 0.05).bfloat16()) is None  # an ordinary bf16 checkpoint
    assert lossless_int4(q4_grid_weight(64, 96)[:, :80]) is None  # input dim not a multiple of the group


@needs_packing
@pytest.mark.skipif(not int4_available(), reason="this torch build has no CPU int4 matmul")
@pytest.mark.parametrize("rows", [1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1], ids=["decode-1", "int4-limit", "oneDNN"])
def test_packed_linear_matches_the_plain_matmul_at_every_batch_size(rows):
    weight, bias = q4_grid_weight(64, 96), torch.randn(64).bfloat16()
    layer = PackedLinear(weight, bias)
    assert layer.int4_weight is not None
    x = torch.randn(rows, 96).bfloat16()
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(layer(x).float(), expected, atol=0.05, rtol=0.02)


def test_float32_models_are_left_unpacked():
    model = tiny_llama(torch.float32, tied=False)
    assert pack_linear_layers(model) == 0
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)


@pytest.mark.parametrize("rotary_dim", [32, 16], ids=["full", "partial"])
def test_step_rope_rotation_matches_the_reference_formula(rotary_dim):
    torch.manual_seed(1)
    q, k = torch.randn(6, 4, 32, dtype=torch.float64), torch.randn(6, 2, 32, dtype=torch.float64)
    cos, sin = (torch.randn(6, 1, rotary_dim // 2, dtype=torch.float64) for _ in range(2))
    rope = StepRope(positions=torch.arange(6), cos=cos, sin=sin)
    for _ in range(2):  # the widened tables are built on the first call and reused by later layers
        rotated_q, rotated_k = rope.rotate(q, k)
        torch.testing.assert_close(rotated_q, apply_rotary(q, cos, sin))
        torch.testing.assert_close(rotated_k, apply_rotary(k, cos, sin))


def test_rms_norm_matches_the_fp32_reference_and_rounds_bf16_once():
    torch.manual_seed(2)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) * 2)
    x = torch.randn(5, 48) * 7
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), expected)
    half = norm.to(torch.bfloat16)
    torch.testing.assert_close(half(x.bfloat16()).float(), expected, atol=0.05, rtol=1e-2)


def test_physical_cores_counts_each_core_once():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


@needs_packing
@pytest.mark.parametrize("rows", [1, 9], ids=["int4", "oneDNN"])
def test_fused_gate_up_computes_silu_of_gate_times_up(rows):
    weight = q4_grid_weight(128, 64)
    layer = PackedGateUpSilu(weight, None)
    x = torch.randn(rows, 64).bfloat16()
    gate, up = torch.nn.functional.linear(x.float(), weight.float()).chunk(2, dim=-1)
    torch.testing.assert_close(layer(x).float(), torch.nn.functional.silu(gate) * up, atol=0.05, rtol=0.02)
