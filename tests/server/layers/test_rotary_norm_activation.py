"""RoPE variants, RMSNorm and SiLU-and-mul against transformers' own implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from weir_server.layers.activation import SiluAndMul
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import StepRope, _joined_heads, apply_rotary, get_rope

HEAD_DIM = 32
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_PARAMETERS))
def test_rope_matches_transformers(rope_type):
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        rope_parameters=ROPE_PARAMETERS[rope_type],
    )
    positions = torch.tensor([0, 1, 5, 77, 1023, 2048, 4095])
    q = torch.randn(len(positions), 4, HEAD_DIM)
    k = torch.randn(len(positions), 2, HEAD_DIM)

    cos, sin = get_rope(config, HEAD_DIM)(positions, torch.float32)
    ours_q, ours_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    cos, sin = LlamaRotaryEmbedding(config)(q, positions.unsqueeze(0))
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1))
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1))


def test_partial_rotary_dim_leaves_the_other_features_alone():
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, partial_rotary_factor=0.5)
    rope = get_rope(config, HEAD_DIM)
    assert rope.rotary_dim == HEAD_DIM // 2
    x = torch.randn(3, 2, HEAD_DIM)
    out = apply_rotary(x, *rope(torch.tensor([0, 4, 9]), torch.float32))
    assert torch.equal(out[..., HEAD_DIM // 2 :], x[..., HEAD_DIM // 2 :])
    torch.testing.assert_close(out[0], x[0])  # position 0 is the identity


def test_rope_reads_pre_v5_rope_scaling_fields():
    class OldConfig:
        rope_theta = 10000.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    rope = get_rope(OldConfig(), HEAD_DIM)
    expected = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)) / 2.0
    torch.testing.assert_close(rope._inv_freq, expected)


def test_unknown_rope_type_is_rejected_with_its_name():
    config = LlamaConfig(hidden_size=128, num_attention_heads=4)
    config.rope_parameters = {"rope_type": "mystery", "rope_theta": 1.0}
    with pytest.raises(ValueError, match="mystery"):
        get_rope(config, HEAD_DIM)


def test_rmsnorm_matches_transformers_and_fuses_the_residual_add():
    ours = RMSNorm(48, eps=1e-5)
    hf = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48))
        hf.weight.copy_(ours.weight)
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    torch.testing.assert_close(ours(x), hf(x))
    normed, summed = ours(x.clone(), residual.clone())  # it may write in place (the CUDA and CPU kernels do)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, hf(x + residual))


def test_silu_and_mul_gates_the_second_half_with_the_first():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :5]) * x[:, 5:])


@pytest.mark.parametrize("tokens", [1, 5], ids=["decode", "prefill"])
def test_q_and_k_of_one_fused_projection_rotate_together_as_they_do_apart(tokens):
    torch.manual_seed(4)
    num_heads, num_kv_heads, head_dim = 6, 2, 16
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim)
    assert _joined_heads(q, k) is not None
    cos, sin = (torch.randn(tokens, 1, head_dim // 2) for _ in range(2))
    rotated_q, rotated_k = StepRope(positions=torch.arange(tokens), cos=cos, sin=sin).rotate(q, k)
    torch.testing.assert_close(rotated_q, apply_rotary(q, cos, sin))
    torch.testing.assert_close(rotated_k, apply_rotary(k, cos, sin))
