"""Each Triton kernel against its float64 reference; runs only where Triton and a CUDA device exist."""

import pytest
import torch

from weir_server.kernels import HAS_TRITON
from weir_server.kernels.activation import silu_and_mul, silu_and_mul_ref
from weir_server.kernels.cache_ops import reshape_and_cache, rotary_and_cache, rotary_and_cache_ref
from weir_server.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from weir_server.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from weir_server.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref
from weir_server.kernels.sampling import top_k_top_p_min_p_sample, top_k_top_p_min_p_sample_ref
from weir_server.kernels.testing import random_paged_batch

needs_gpu = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs Triton and CUDA")


@pytest.mark.skipif(HAS_TRITON, reason="Triton is installed")
def test_kernels_raise_import_error_without_triton():
    with pytest.raises(ImportError, match="triton"):
        silu_and_mul(torch.randn(2, 8))


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-2) -> None:
    assert torch.isfinite(got).all()
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    assert err < rel, f"relative error {err:.2e}"


@needs_gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(8, 8), (12, 4), (32, 8)])
@pytest.mark.parametrize("sliding_window", [None, 100])
def test_decode_kernel_matches_reference(num_heads, num_kv_heads, sliding_window):
    batch = random_paged_batch(
        [1, 300, 2000, 17], [1] * 4, num_heads, num_kv_heads, 128, 16, torch.bfloat16, "cuda"
    )
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, 0.088, sliding_window)
    close(paged_decode_attention(*args), paged_decode_attention_ref(*args))


@needs_gpu
def test_prefill_kernel_matches_reference_on_mixed_chunks():
    batch = random_paged_batch([100, 700, 33, 1], [100, 64, 1, 1], 12, 4, 64, 8, torch.bfloat16, "cuda")
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, batch.query_start_loc)
    close(
        paged_prefill_attention(*args, batch.max_query_len, 0.125),
        paged_prefill_attention_ref(*args, batch.max_query_len, 0.125),
    )


@needs_gpu
def test_rotary_and_cache_kernel_matches_reference():
    q, k, v = (torch.randn(9, h, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    positions = torch.randint(0, 64, (9,), device="cuda")
    freqs = torch.outer(torch.arange(64.0), 1.0 / 10000 ** (torch.arange(0, 128, 2) / 128)).cuda()
    table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    slots = torch.tensor([0, 5, -1, 7, 8, 30, 31, 2, 3], device="cuda")
    caches = [torch.zeros(2, 2, 16, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    inputs = [(q.clone(), k.clone(), v.clone()) for _ in range(2)]
    rotary_and_cache(*inputs[0], positions, table, caches[0], slots)
    rotary_and_cache_ref(*inputs[1], positions, table, caches[1], slots)
    for got, want in zip((*inputs[0], caches[0]), (*inputs[1], caches[1]), strict=True):
        close(got, want, 1e-2)
    k2, cache = k.clone(), torch.zeros_like(caches[0])
    reshape_and_cache(k2, v, cache, slots)
    assert torch.equal(cache[0].view(-1, 2, 128)[slots[slots >= 0]], k2[slots >= 0])


@needs_gpu
def test_norm_and_activation_kernels_match_references():
    x, res = (torch.randn(7, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    got = fused_add_rms_norm(x.clone(), res.clone(), weight, 1e-6)
    want = fused_add_rms_norm_ref(x.clone(), res.clone(), weight, 1e-6)
    for g, w in zip(got, want, strict=True):
        close(g, w)
    close(silu_and_mul(x), silu_and_mul_ref(x))


@needs_gpu
def test_sampling_kernel_agrees_with_reference():
    logits = torch.randn(64, 32000, device="cuda") * 3
    temperatures = torch.rand(64, device="cuda") + 0.2
    temperatures[:8] = 0
    top_k = torch.randint(0, 50, (64,), device="cuda")
    top_p = torch.rand(64, device="cuda") * 0.5 + 0.5
    min_p = torch.rand(64, device="cuda") * 0.1
    seeds = torch.randint(0, 2**62, (64,), device="cuda")
    args = (logits, temperatures, top_k, top_p, min_p, seeds)
    agree = (top_k_top_p_min_p_sample(*args) == top_k_top_p_min_p_sample_ref(*args)).float().mean()
    assert agree >= 0.95
