"""References of the cache write, rotary, RMSNorm and SiLU-and-mul against loops and Hugging Face's code."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from weir_server.kernels.activation import silu_and_mul_ref
from weir_server.kernels.cache_ops import reshape_and_cache_ref, rotary_and_cache_ref, rotate_neox_ref
from weir_server.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref


def cos_sin_cache(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def test_reshape_and_cache_ref_writes_each_slot_and_skips_negative_ones():
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    cache = torch.zeros(2, 4, 4, 2, 8)
    slots = torch.tensor([3, 4, -1, 15, 0])
    reshape_and_cache_ref(k, v, cache, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(cache[0, slot // 4, slot % 4], k[t])
            assert torch.equal(cache[1, slot // 4, slot % 4], v[t])
    assert cache.abs().sum(dim=(-1, -2)).count_nonzero() == 2 * 4  # four slots written, in K and V


def test_rotary_ref_matches_hugging_face_rotate_half():
    positions = torch.tensor([0, 5, 17, 3])
    q, k = torch.randn(4, 6, 32, dtype=torch.float64), torch.randn(4, 2, 32, dtype=torch.float64)
    table = cos_sin_cache(32, 32)
    cos = torch.cat([table[positions, :16]] * 2, dim=-1)
    sin = torch.cat([table[positions, 16:]] * 2, dim=-1)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # [T, heads, D] with cos [T, D]
    torch.testing.assert_close(rotate_neox_ref(q, positions, table), want_q)
    torch.testing.assert_close(rotate_neox_ref(k, positions, table), want_k)


def test_partial_rotary_ref_leaves_the_tail_dims_alone():
    x = torch.randn(3, 2, 32, dtype=torch.float64)
    out = rotate_neox_ref(x, torch.tensor([1, 2, 3]), cos_sin_cache(8, 16))
    assert torch.equal(out[..., 16:], x[..., 16:])
    assert not torch.allclose(out[..., :16], x[..., :16])


def test_rotary_and_cache_ref_caches_the_rotated_keys():
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    k_before = k.clone()
    cache = torch.zeros(2, 2, 4, 2, 16)
    positions, slots = torch.tensor([2, 3, 4]), torch.tensor([5, 6, 7])
    rotary_and_cache_ref(q, k, v, positions, cos_sin_cache(8, 16).float(), cache, slots)
    assert not torch.allclose(k, k_before)
    assert torch.equal(cache[0, 1, 1:4], k)
    assert torch.equal(cache[1, 1, 1:4], v)


@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_ref_matches_loop_and_hugging_face(hidden):
    x, weight = torch.randn(5, hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    got = rms_norm_ref(x, weight, 1e-6)
    for row in range(5):
        rms = (sum(float(v) ** 2 for v in x[row]) / hidden + 1e-6) ** 0.5
        torch.testing.assert_close(got[row], x[row] / rms * weight)
    norm = LlamaRMSNorm(hidden, eps=1e-6).double()
    norm.weight.data.copy_(weight)
    torch.testing.assert_close(got, norm(x), rtol=1e-5, atol=1e-5)  # it computes in float32


def test_fused_add_rms_norm_ref_updates_both_in_place():
    x, residual, weight = torch.randn(3, 4, 32), torch.randn(3, 4, 32), torch.randn(32)
    total = x + residual
    x_out, residual_out = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert x_out is x and residual_out is residual
    torch.testing.assert_close(residual, total)
    torch.testing.assert_close(x, rms_norm_ref(total, weight, 1e-5).float())


def test_silu_and_mul_ref_matches_loop():
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    got = silu_and_mul_ref(x)
    assert got.shape == (2, 3, 5)
    for i in range(2):
        for j in range(3):
            for c in range(5):
                gate, up = float(x[i, j, c]), float(x[i, j, c + 5])
                assert abs(float(got[i, j, c]) - gate / (1 + math.exp(-gate)) * up) < 1e-12
    torch.testing.assert_close(got, F.silu(x[..., :5]) * x[..., 5:])
