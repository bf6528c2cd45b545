"""Each Triton kernel against its float64 reference, over the shapes the engine runs (marked `gpu`: they run on
the GPU machine, `pytest -m gpu`, and are skipped where CUDA is absent). Outputs are compared by relative error
||out - ref|| / ||ref|| in float64; a NaN-poisoned allocation before each call makes unwritten output show."""

import pytest
import torch

from weir_server.kernels import HAS_TRITON, activation, cache_ops, rms_norm, sampling
from weir_server.kernels.decode_attention import decode_attention, paged_decode_attention, paged_decode_attention_ref
from weir_server.kernels.prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_attention,
)
from weir_server.kernels.testing import POISON, random_paged_batch

gpu = pytest.mark.gpu
DEV = "cuda"
BF16, FP16 = torch.bfloat16, torch.float16
TOLERANCE = {BF16: 1e-2, FP16: 2e-3, torch.float32: 1e-4}


@pytest.mark.skipif(HAS_TRITON, reason="Triton is installed")
def test_kernels_raise_import_error_without_triton():
    with pytest.raises(ImportError, match="triton"):
        activation.silu_and_mul(torch.randn(2, 8))


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Finite, within the dtype's relative error, and nowhere near a poisoned value."""
    got64, want64 = got.double(), want.double()
    assert torch.isfinite(got64).all(), "non-finite output (unwritten or overflowed)"
    rel = ((got64 - want64).norm() / want64.norm().clamp_min(1e-30)).item()
    max_abs = (got64 - want64).abs().max().item() if got.numel() else 0.0
    assert rel < TOLERANCE[dtype], f"relative error {rel:.2e}"
    assert max_abs < POISON / 100, f"max abs error {max_abs:.2e}: read the poisoned padding block"


def poison(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Leave NaN in the allocator block the kernel's output will most likely reuse: unwritten output shows."""
    scratch = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    del scratch


def contexts(batch: int, max_ctx: int, seed: int) -> list[int]:
    """Random context lengths up to max_ctx, the longest always among them."""
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()
    lens[0] = max_ctx
    return lens


DECODE_CASES = [  # batch, max_ctx, heads, kv_heads, head_dim, block_size, window, dtype
    (1, 4096, 32, 8, 128, 16, None, BF16),
    (1, 1, 8, 8, 64, 16, None, BF16),
    (7, 4096, 12, 4, 64, 8, None, BF16),
    (7, 3000, 8, 8, 128, 32, 500, BF16),
    (64, 2048, 32, 8, 128, 16, None, FP16),
    (64, 4096, 24, 8, 64, 16, 1000, BF16),
    (256, 4096, 16, 4, 128, 16, None, BF16),
    (256, 1024, 12, 4, 64, 16, 256, FP16),
]


@gpu
@pytest.mark.parametrize(("b", "ctx", "h", "hkv", "d", "bs", "win", "dtype"), DECODE_CASES)
def test_decode_kernel_matches_reference(b, ctx, h, hkv, d, bs, win, dtype):
    batch = random_paged_batch(contexts(b, ctx, b + ctx), [1] * b, h, hkv, d, bs, dtype, DEV, seed=b + ctx)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, d**-0.5, win)
    poison(tuple(batch.q.shape), dtype)
    assert_matches(paged_decode_attention(*args, max_context_len=ctx), paged_decode_attention_ref(*args), dtype)


@gpu
def test_decode_kernel_with_a_stale_too_small_bound_still_reads_every_partition():
    batch = random_paged_batch(contexts(7, 4096, 2), [1] * 7, 12, 4, 64, 8, BF16, DEV, seed=2)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, 64**-0.5, None)
    got = decode_attention(
        batch.q, batch.kv_cache[0], batch.kv_cache[1], batch.block_tables, batch.context_lens, 64**-0.5, None,
        max_context_len=300, partition_size=256,
    )  # fmt: skip
    assert_matches(got, paged_decode_attention_ref(*args), BF16)


@gpu
def test_decode_kernel_replayed_in_a_cuda_graph_follows_new_lengths():
    batch = random_paged_batch(contexts(8, 2048, 5), [1] * 8, 32, 8, 128, 16, BF16, DEV, seed=5)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, 0.088)
    paged_decode_attention(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*args)
    batch.context_lens.copy_(torch.tensor(contexts(8, 2048, 6), dtype=torch.int32))  # new lengths, same graph
    batch.q.normal_()
    graph.replay()
    assert_matches(out, paged_decode_attention_ref(*args), BF16)


# (block_m, block_n, num_warps, num_stages): the configurations the prefill kernel is tuned over.
PREFILL_CONFIGS = [
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 2),
]
PREFILL_CASES = {  # context lens, query lens ("chunks": up to 128 each, "decode": up to 4), heads, kv heads, D, bs, win
    "one 1024-token prompt": ([1024], [1024], 32, 8, 128, 16, None, BF16),
    "7 chunks": (contexts(7, 4096, 11), "chunks", 12, 4, 64, 8, None, BF16),
    "64 chunks, window 300": (contexts(64, 2048, 12), "chunks", 8, 8, 128, 16, 300, FP16),
    "256 short queries": (contexts(256, 1024, 13), "decode", 16, 4, 128, 16, None, BF16),
    "prompt, chunk and decode, window 1000": ([4096, 37, 512], [512, 37, 1], 32, 32, 64, 32, 1000, BF16),
    "mixed chunks, D=64 bs=8": ([100, 700, 33, 1], [100, 64, 1, 1], 12, 4, 64, 8, None, BF16),
}


def prefill_inputs(case: str) -> tuple[tuple, torch.dtype]:
    ctxs, qlens, h, hkv, d, bs, win, dtype = PREFILL_CASES[case]
    if isinstance(qlens, str):
        gen = torch.Generator().manual_seed(len(ctxs))
        most = 129 if qlens == "chunks" else 5
        qlens = [min(c, int(torch.randint(1, most, (1,), generator=gen))) for c in ctxs]
    batch = random_paged_batch(ctxs, qlens, h, hkv, d, bs, dtype, DEV, seed=len(ctxs))
    meta = (batch.block_tables, batch.context_lens, batch.query_start_loc, batch.max_query_len, d**-0.5, win)
    return (batch.q, batch.kv_cache, *meta), dtype


@gpu
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_kernel_matches_reference(case):
    args, dtype = prefill_inputs(case)
    poison(tuple(args[0].shape), dtype)
    assert_matches(paged_prefill_attention(*args), paged_prefill_attention_ref(*args), dtype)


@gpu
@pytest.mark.parametrize("case", ["one 1024-token prompt", "prompt, chunk and decode, window 1000"])
@pytest.mark.parametrize("config", PREFILL_CONFIGS, ids=lambda c: "m={} n={} warps={} stages={}".format(*c))
def test_every_tuned_prefill_config_matches_reference(case, config):
    (q, kv_cache, *meta), dtype = prefill_inputs(case)
    got = prefill_attention(q, kv_cache[0], kv_cache[1], *meta, *config)
    assert_matches(got, paged_prefill_attention_ref(q, kv_cache, *meta), dtype)


def rope_table(max_pos: int, rot: int) -> torch.Tensor:
    inv = 1.0 / 500000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=DEV) / rot)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=DEV), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


@gpu
@pytest.mark.parametrize(
    ("tokens", "h", "hkv", "d", "rot", "dtype"),
    [(7, 32, 8, 128, 128, BF16), (256, 12, 4, 64, 64, FP16), (4096, 32, 8, 128, 64, BF16), (1, 8, 8, 80, 80, BF16)],
)
def test_rotary_and_cache_kernels_match_references(tokens, h, hkv, d, rot, dtype):
    q, k, v = (torch.randn(tokens, n, d, device=DEV, dtype=dtype) for n in (h, hkv, hkv))
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    num_blocks = tokens // 16 + 2
    slots = torch.randperm(num_blocks * 16, device=DEV)[:tokens]
    slots[::5] = -1  # padding tokens write nothing
    caches = [torch.randn(2, num_blocks, 16, hkv, d, device=DEV, dtype=dtype) for _ in range(2)]
    caches[1].copy_(caches[0])
    got, want = (q.clone(), k.clone(), v.clone()), (q.clone(), k.clone(), v.clone())
    cache_ops.rotary_and_cache(*got, positions, rope_table(8192, rot), caches[0], slots)
    cache_ops.rotary_and_cache_ref(*want, positions, rope_table(8192, rot), caches[1], slots)
    for g, w in ((got[0], want[0]), (got[1], want[1]), (caches[0], caches[1])):
        assert_matches(g, w, dtype)
    cache_ops.reshape_and_cache(k, v, caches[0], slots)
    cache_ops.reshape_and_cache_ref(k, v, caches[1], slots)
    assert torch.equal(caches[0], caches[1]), "reshape_and_cache only copies: it must be exact"


@gpu
@pytest.mark.parametrize(("rows", "hidden", "dtype"), [(1, 4096, BF16), (7, 576, BF16), (256, 4096, FP16),
                                                       (64, 8192, BF16), (3, 100, BF16)])  # fmt: skip
def test_norm_and_activation_kernels_match_references(rows, hidden, dtype):
    x, res = (torch.randn(rows, hidden, device=DEV, dtype=dtype) for _ in range(2))
    w = torch.randn(hidden, device=DEV, dtype=dtype)
    poison((rows, hidden), dtype)
    assert_matches(rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_ref(x, w, 1e-6), dtype)
    got = rms_norm.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-6)
    want = rms_norm.fused_add_rms_norm_ref(x.clone(), res.clone(), w, 1e-6)
    for g, r in zip(got, want, strict=True):
        assert_matches(g, r, dtype)
    gate_up = torch.randn(rows, 2 * hidden, device=DEV, dtype=dtype)
    poison((rows, hidden), dtype)
    assert_matches(activation.silu_and_mul(gate_up), activation.silu_and_mul_ref(gate_up), dtype)


@gpu
def test_sampling_kernel_noise_is_the_torch_noise():
    seeds = torch.arange(64, device=DEV) * 7919 - 100
    greedy = torch.zeros(64, dtype=torch.bool, device=DEV)
    got = sampling.gumbel_argmax(torch.zeros(64, 50000, device=DEV), seeds, greedy)
    assert torch.equal(got, sampling.gumbel_noise(seeds, 50000).argmax(dim=-1))


@gpu
@pytest.mark.parametrize(("batch", "vocab"), [(1, 49152), (64, 128256), (256, 32000)])
def test_sampling_kernel_agrees_with_reference_and_stays_in_the_allowed_set(batch, vocab):
    gen = torch.Generator(device=DEV).manual_seed(batch)
    logits = torch.randn(batch, vocab, device=DEV, generator=gen) * 4
    temps = torch.rand(batch, device=DEV, generator=gen) * 1.5 + 0.1
    temps[::5] = 0.0  # greedy rows
    top_k = torch.randint(0, 100, (batch,), device=DEV, generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(batch, device=DEV, generator=gen) * 0.5 + 0.5
    top_p[::4] = 1.0
    min_p = torch.rand(batch, device=DEV, generator=gen) * 0.2
    seeds = torch.randint(0, 2**62, (batch,), device=DEV, generator=gen)
    args = (logits, temps, top_k, top_p, min_p, seeds)
    got = sampling.top_k_top_p_min_p_sample(*args)
    scaled = logits.double() / torch.where(temps > 0, temps, 1.0).double()[:, None]
    allowed = sampling.apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p) > float("-inf")
    assert int((~allowed.gather(1, got[:, None])).sum()) == 0, "sampled a token the filters remove"
    agree = (got == sampling.top_k_top_p_min_p_sample_ref(*args)).double().mean().item()
    assert agree >= 0.97, f"agrees with the reference's draw on {agree:.1%} of rows"


@gpu
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("win", [None, 300])
def test_soft_capped_decode_kernel_matches_reference(win, dtype):
    batch = random_paged_batch(contexts(7, 3000, 21), [1] * 7, 8, 2, 128, 16, dtype, DEV, seed=21)
    args = (batch.q * 4, batch.kv_cache, batch.block_tables, batch.context_lens, 128**-0.5, win)
    got = paged_decode_attention(*args, max_context_len=3000, logit_softcap=5.0)
    assert_matches(got, paged_decode_attention_ref(*args, logit_softcap=5.0), dtype)


@gpu
@pytest.mark.parametrize("case", ["7 chunks", "prompt, chunk and decode, window 1000"])
def test_soft_capped_prefill_kernel_matches_reference(case):
    (q, *rest), dtype = prefill_inputs(case)
    args = (q * 4, *rest)
    assert_matches(paged_prefill_attention(*args, logit_softcap=5.0), paged_prefill_attention_ref(*args, 5.0), dtype)


@gpu
@pytest.mark.parametrize(("rows", "k", "dtype"), [(1, 2048, BF16), (256, 14336, BF16), (7, 576, FP16), (3, 100, BF16)])
def test_fp8_row_quantization_kernel_matches_torch(rows, k, dtype):
    from weir_server.kernels import fp8_matmul

    x = torch.randn(rows, k, device=DEV, dtype=dtype) * torch.logspace(-3, 2, rows, device=DEV).to(dtype)[:, None]
    x[0, :3] = 0  # a row's zeros stay zeros
    q, scale = fp8_matmul.quantize_per_row_kernel(x)
    want_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) * fp8_matmul._INV_FP8_MAX
    want_q = (x.float() / want_scale).clamp(-fp8_matmul.FP8_MAX, fp8_matmul.FP8_MAX).to(fp8_matmul.FP8)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    zero_rows = fp8_matmul.quantize_per_row_kernel(torch.zeros(2, 64, device=DEV, dtype=BF16))
    assert torch.equal(zero_rows[0].float(), torch.zeros(2, 64, device=DEV)) and (zero_rows[1] > 0).all()
    assert fp8_matmul.row_kernel_agrees(torch.device(DEV))  # so FP8 layers take it
