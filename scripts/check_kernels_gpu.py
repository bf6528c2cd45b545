"""Check every Triton kernel in server/kernels against its float64 reference on a GPU, then benchmark.

Run on a CUDA machine from the repository root: `python scripts/check_kernels_gpu.py [--quick] [--no-bench]`.
It imports only torch, triton and server/kernels (the package is mapped by path, without
weir_server/__init__ or grpc), prints a PASS/FAIL table with errors and benchmark tables, and writes the log
to $OUT/check_kernels.log when OUT is set.
"""

import argparse
import os
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
_package = types.ModuleType("weir_server")  # a bare package: skips weir_server/__init__ and its imports
_package.__path__ = [str(ROOT / "server" / "weir_server")]
sys.modules.setdefault("weir_server", _package)

import triton.testing  # noqa: E402

from weir_server.kernels import activation, cache_ops, rms_norm, sampling  # noqa: E402
from weir_server.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from weir_server.kernels.prefill_attention import (  # noqa: E402
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_attention,
)
from weir_server.kernels.testing import POISON, random_paged_batch  # noqa: E402

DEV = "cuda"
BF16, FP16 = torch.bfloat16, torch.float16
TOLERANCE = {BF16: 1e-2, FP16: 2e-3, torch.float32: 1e-4}  # ||out - ref|| / ||ref||
RESULTS: list[tuple[str, str, str, float, float, bool]] = []
LOG: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


def poison(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Leave NaN in the allocator block the kernel's output will most likely reuse: unwritten output shows."""
    scratch = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    del scratch


def record(name: str, shape: str, dtype: torch.dtype, got: torch.Tensor, want: torch.Tensor) -> None:
    got64, want64 = got.double(), want.double()
    finite = bool(torch.isfinite(got64).all())
    max_abs = (got64 - want64).abs().max().item() if got.numel() else 0.0
    rel = ((got64 - want64).norm() / want64.norm().clamp_min(1e-30)).item() if got.numel() else 0.0
    ok = finite and rel < TOLERANCE[dtype] and max_abs < POISON / 100
    RESULTS.append((name, shape, str(dtype).removeprefix("torch."), max_abs, rel, ok))


def guarded(name: str, fn: Callable[[], None]) -> None:
    """Run one check; an exception becomes a FAIL row with its traceback in the log."""
    try:
        fn()
    except Exception as error:  # a crash in one kernel must not hide the others' results
        say(f"[{name}] raised:\n{traceback.format_exc()}")
        RESULTS.append((name, "exception", type(error).__name__, float("nan"), float("nan"), False))
    torch.cuda.synchronize()


def contexts(batch: int, max_ctx: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen).tolist()
    lens[0] = max_ctx  # the longest always appears
    return lens


# ---------------------------------------------------------------- correctness


def check_decode(quick: bool) -> None:
    cases = [  # batch, max_ctx, heads, kv_heads, head_dim, block_size, window, dtype
        (1, 4096, 32, 8, 128, 16, None, BF16),
        (1, 1, 8, 8, 64, 16, None, BF16),
        (7, 4096, 12, 4, 64, 8, None, BF16),
        (7, 3000, 8, 8, 128, 32, 500, BF16),
        (64, 2048, 32, 8, 128, 16, None, FP16),
        (64, 4096, 24, 8, 64, 16, 1000, BF16),
        (256, 4096, 16, 4, 128, 16, None, BF16),
        (256, 1024, 12, 4, 64, 16, 256, FP16),
    ]
    for i, (b, ctx, h, hkv, d, bs, win, dtype) in enumerate(cases[:4] if quick else cases):
        name = f"decode B={b} ctx<={ctx} H={h}/{hkv} D={d} bs={bs} win={win}"

        def run(b=b, ctx=ctx, h=h, hkv=hkv, d=d, bs=bs, win=win, dtype=dtype, i=i, case=name[7:]):
            batch = random_paged_batch(contexts(b, ctx, i), [1] * b, h, hkv, d, bs, dtype, DEV, seed=i)
            args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, d**-0.5, win)
            poison(tuple(batch.q.shape), dtype)
            got = paged_decode_attention(*args, max_context_len=ctx)
            record("decode", case, dtype, got, paged_decode_attention_ref(*args))
            if i == 2:  # a stale, too-small bound must still be right (the last partition runs on)
                got = decode_attention(
                    batch.q,
                    batch.kv_cache[0],
                    batch.kv_cache[1],
                    batch.block_tables,
                    batch.context_lens,
                    d**-0.5,
                    win,
                    max_context_len=300,
                    partition_size=256,
                )
                record("decode", "stale bound 300, partition 256", dtype, got, paged_decode_attention_ref(*args))

        guarded(name, run)


def check_decode_cuda_graph() -> None:
    def run():
        batch = random_paged_batch(contexts(8, 2048, 5), [1] * 8, 32, 8, 128, 16, BF16, DEV, seed=5)
        args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, 0.088)
        paged_decode_attention(*args)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_decode_attention(*args)
        batch.context_lens.copy_(torch.tensor(contexts(8, 2048, 6), dtype=torch.int32))  # new lengths, same graph
        batch.q.normal_()
        graph.replay()
        record("decode", "CUDA graph replay, new lengths", BF16, out, paged_decode_attention_ref(*args))

    guarded("decode cuda graph", run)


def check_prefill(quick: bool) -> None:
    cases = [  # context lens, query lens, heads, kv_heads, head_dim, block_size, window, dtype
        ([1024], [1024], 32, 8, 128, 16, None, BF16),
        (contexts(7, 4096, 11), None, 12, 4, 64, 8, None, BF16),
        (contexts(64, 2048, 12), None, 8, 8, 128, 16, 300, FP16),
        (contexts(256, 1024, 13), "decode", 16, 4, 128, 16, None, BF16),
        ([4096, 37, 512], [512, 37, 1], 32, 32, 64, 32, 1000, BF16),
    ]
    for i, (ctxs, qlens, h, hkv, d, bs, win, dtype) in enumerate(cases[:2] if quick else cases):
        gen = torch.Generator().manual_seed(100 + i)
        if qlens is None:  # chunks of up to 128 tokens, some decode rows
            qlens = [min(c, int(torch.randint(1, 129, (1,), generator=gen))) for c in ctxs]
        elif qlens == "decode":
            qlens = [min(c, int(torch.randint(1, 5, (1,), generator=gen))) for c in ctxs]
        name = f"B={len(ctxs)} T={sum(qlens)} ctx<={max(ctxs)} H={h}/{hkv} D={d} bs={bs} win={win}"

        def run(ctxs=ctxs, qlens=qlens, h=h, hkv=hkv, d=d, bs=bs, win=win, dtype=dtype, i=i, name=name):
            batch = random_paged_batch(ctxs, qlens, h, hkv, d, bs, dtype, DEV, seed=200 + i)
            args = (
                batch.q,
                batch.kv_cache,
                batch.block_tables,
                batch.context_lens,
                batch.query_start_loc,
                batch.max_query_len,
                d**-0.5,
                win,
            )
            poison(tuple(batch.q.shape), dtype)
            record("prefill", name, dtype, paged_prefill_attention(*args), paged_prefill_attention_ref(*args))
            for block_m, block_n, warps, stages in PREFILL_CONFIGS if i in (0, 4) else ():
                got = prefill_attention(
                    batch.q, batch.kv_cache[0], batch.kv_cache[1], *args[2:], block_m, block_n, warps, stages
                )
                config = f"  m={block_m} n={block_n} warps={warps} stages={stages}"
                record("prefill", config, dtype, got, paged_prefill_attention_ref(*args))

        guarded("prefill " + name, run)


def cos_sin(max_pos: int, rot: int) -> torch.Tensor:
    inv = 1.0 / 500000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=DEV) / rot)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=DEV), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def check_cache_ops() -> None:
    for tokens, h, hkv, d, rot, dtype in [
        (7, 32, 8, 128, 128, BF16),
        (256, 12, 4, 64, 64, FP16),
        (4096, 32, 8, 128, 64, BF16),
        (1, 8, 8, 80, 80, BF16),
    ]:
        name = f"T={tokens} H={h}/{hkv} D={d} rot={rot}"

        def run(tokens=tokens, h=h, hkv=hkv, d=d, rot=rot, dtype=dtype, name=name):
            q, k, v = (torch.randn(tokens, n, d, device=DEV, dtype=dtype) for n in (h, hkv, hkv))
            positions = torch.randint(0, 8192, (tokens,), device=DEV)
            num_blocks = tokens // 16 + 2
            slots = torch.randperm(num_blocks * 16, device=DEV)[:tokens]
            slots[::5] = -1  # padding tokens write nothing
            table = cos_sin(8192, rot)
            caches = [torch.randn(2, num_blocks, 16, hkv, d, device=DEV, dtype=dtype) for _ in range(2)]
            caches[1].copy_(caches[0])
            got, want = (q.clone(), k.clone(), v.clone()), (q.clone(), k.clone(), v.clone())
            cache_ops.rotary_and_cache(*got, positions, table, caches[0], slots)
            cache_ops.rotary_and_cache_ref(*want, positions, table, caches[1], slots)
            record("rotary_and_cache", name + " q", dtype, got[0], want[0])
            record("rotary_and_cache", name + " k", dtype, got[1], want[1])
            record("rotary_and_cache", name + " cache", dtype, caches[0], caches[1])
            cache_ops.reshape_and_cache(k, v, caches[0], slots)
            cache_ops.reshape_and_cache_ref(k, v, caches[1], slots)
            record("reshape_and_cache", name, dtype, caches[0], caches[1])

        guarded("cache " + name, run)


def check_norms() -> None:
    for rows, hidden, dtype in [(1, 4096, BF16), (7, 576, BF16), (256, 4096, FP16), (64, 8192, BF16), (3, 100, BF16)]:
        name = f"rows={rows} hidden={hidden}"

        def run(rows=rows, hidden=hidden, dtype=dtype, name=name):
            x, res = (torch.randn(rows, hidden, device=DEV, dtype=dtype) for _ in range(2))
            w = torch.randn(hidden, device=DEV, dtype=dtype)
            poison((rows, hidden), dtype)
            record("rms_norm", name, dtype, rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_ref(x, w, 1e-6))
            got = rms_norm.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-6)
            want = rms_norm.fused_add_rms_norm_ref(x.clone(), res.clone(), w, 1e-6)
            record("fused_add_rms_norm", name + " x", dtype, got[0], want[0])
            record("fused_add_rms_norm", name + " residual", dtype, got[1], want[1])
            gate_up = torch.randn(rows, 2 * hidden, device=DEV, dtype=dtype)
            poison((rows, hidden), dtype)
            record("silu_and_mul", name, dtype, activation.silu_and_mul(gate_up), activation.silu_and_mul_ref(gate_up))

        guarded("norms " + name, run)


def sampling_inputs(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    logits = torch.randn(batch, vocab, device=DEV, generator=gen) * 4
    temperatures = torch.rand(batch, device=DEV, generator=gen) * 1.5 + 0.1
    temperatures[::5] = 0.0
    top_k = torch.randint(0, 100, (batch,), device=DEV, generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(batch, device=DEV, generator=gen) * 0.5 + 0.5
    top_p[::4] = 1.0
    min_p = torch.rand(batch, device=DEV, generator=gen) * 0.2
    seeds = torch.randint(0, 2**62, (batch,), device=DEV, generator=gen)
    return logits, temperatures, top_k, top_p, min_p, seeds


def check_sampling() -> None:
    def noise():
        seeds = torch.arange(64, device=DEV) * 7919 - 100
        zeros = torch.zeros(64, 50000, device=DEV)
        got = sampling.gumbel_argmax(zeros, seeds, torch.zeros(64, dtype=torch.bool, device=DEV))
        want = sampling.gumbel_noise(seeds, 50000).argmax(dim=-1)
        RESULTS.append(
            (
                "sampling",
                "noise == torch noise (argmax)",
                "int",
                float((got != want).sum()),
                0.0,
                bool(torch.equal(got, want)),
            )
        )

    guarded("sampling noise", noise)
    for batch, vocab in [(1, 49152), (64, 128256), (256, 32000)]:

        def run(batch=batch, vocab=vocab):
            args = sampling_inputs(batch, vocab, batch)
            got = sampling.top_k_top_p_min_p_sample(*args)
            want = sampling.top_k_top_p_min_p_sample_ref(*args)
            logits, temps, top_k, top_p, min_p, _ = args
            scaled = logits.double() / torch.where(temps > 0, temps, 1.0).double()[:, None]
            allowed = sampling.apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p) > float("-inf")
            outside = int((~allowed.gather(1, got[:, None])).sum())
            agree = (got == want).double().mean().item()
            RESULTS.append(
                (
                    "sampling",
                    f"B={batch} V={vocab} agree={agree:.3f} outside_set={outside}",
                    "fp32",
                    1.0 - agree,
                    0.0,
                    agree >= 0.97 and outside == 0,
                )
            )

        guarded(f"sampling B={batch}", run)


# ---------------------------------------------------------------- benchmarks


def bench(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def gathered_sdpa(q, kv_cache, block_tables, max_ctx, scale):
    """The torch path's decode: gather the blocks, then SDPA over [B, Hkv, L, D] with GQA."""
    bs = kv_cache.shape[2]
    k = kv_cache[0][block_tables[:, : -(-max_ctx // bs)].long()].flatten(1, 2)[:, :max_ctx]
    v = kv_cache[1][block_tables[:, : -(-max_ctx // bs)].long()].flatten(1, 2)[:, :max_ctx]
    return F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, enable_gqa=True
    )


def bench_decode(quick: bool) -> list[str]:
    h, hkv, d = 32, 8, 128
    rows = [
        f"{'B':>4} {'ctx':>5} | {'triton ms':>9} {'GB/s':>6} | {'gather+sdpa ms':>14} | {'sdpa only ms':>12} | speedup"
    ]
    for b in (1, 7, 64, 256):
        for ctx in (512, 4096):
            if quick and b in (7, 64):
                continue
            batch = random_paged_batch([ctx] * b, [1] * b, h, hkv, d, 16, BF16, DEV, seed=b + ctx)
            args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, d**-0.5)
            t_triton = bench(lambda args=args, ctx=ctx: paged_decode_attention(*args, max_context_len=ctx))
            t_torch = bench(
                lambda batch=batch, ctx=ctx: gathered_sdpa(batch.q, batch.kv_cache, batch.block_tables, ctx, d**-0.5)
            )
            bs = 16
            k = batch.kv_cache[0][batch.block_tables[:, : ctx // bs].long()].flatten(1, 2).transpose(1, 2).contiguous()
            v = batch.kv_cache[1][batch.block_tables[:, : ctx // bs].long()].flatten(1, 2).transpose(1, 2).contiguous()
            t_sdpa = bench(
                lambda k=k, v=v, batch=batch: F.scaled_dot_product_attention(
                    batch.q.unsqueeze(2), k, v, scale=d**-0.5, enable_gqa=True
                )
            )
            gbps = b * ctx * hkv * d * 2 * 2 / t_triton / 1e6
            rows.append(
                f"{b:>4} {ctx:>5} | {t_triton:9.4f} {gbps:6.0f} | {t_torch:14.4f} | {t_sdpa:12.4f} | "
                f"{t_torch / t_triton:5.1f}x"
            )
            del batch, k, v
    return rows


def bench_decode_configs() -> list[str]:
    rows = [f"{'B':>4} {'ctx':>5} {'block_n':>7} {'warps':>5} {'partition':>9} | ms"]
    for b, ctx in ((1, 4096), (7, 4096), (64, 4096)):
        batch = random_paged_batch([ctx] * b, [1] * b, 32, 8, 128, 16, BF16, DEV, seed=9)
        kc, vc = batch.kv_cache[0], batch.kv_cache[1]
        for block_n, warps, part in (
            (32, 4, None),
            (64, 4, None),
            (128, 4, None),
            (64, 8, None),
            (128, 8, None),
            (64, 4, 256),
            (64, 4, 1024),
            (64, 4, 0),
        ):
            call = (batch.q, kc, vc, batch.block_tables, batch.context_lens, 0.088, None, ctx, part, block_n, warps)
            t = bench(lambda call=call: decode_attention(*call))
            rows.append(f"{b:>4} {ctx:>5} {block_n:>7} {warps:>5} {str(part):>9} | {t:.4f}")
    return rows


PREFILL_CONFIGS = [
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 2),
]


def warm_gpu() -> None:
    """Run the clocks up first, so the first table row is not measured on an idle GPU."""
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    for _ in range(100):
        a @ a
    torch.cuda.synchronize()


def bench_prefill() -> list[str]:
    rows = [f"{'case':<34} | {'triton ms':>9} | {'flash sdpa ms':>13}"]
    for label, ctxs, qlens in (
        ("1 x 4096 prompt", [4096], [4096]),
        ("8 x 512-token chunks, ctx 2048", [2048] * 8, [512] * 8),
    ):
        batch = random_paged_batch(ctxs, qlens, 32, 8, 128, 16, BF16, DEV, seed=3)
        args = (
            batch.q,
            batch.kv_cache,
            batch.block_tables,
            batch.context_lens,
            batch.query_start_loc,
            batch.max_query_len,
            0.088,
        )
        t = bench(lambda args=args: paged_prefill_attention(*args))
        kc, vc = batch.kv_cache[0], batch.kv_cache[1]
        for block_m, block_n, warps, stages in PREFILL_CONFIGS:
            call = (batch.q, kc, vc, *args[2:], None, block_m, block_n, warps, stages)
            t_cfg = bench(lambda call=call: prefill_attention(*call))
            rows.append(f"  {label:<32} m={block_m} n={block_n} warps={warps} stages={stages} | {t_cfg:.4f}")
        q = torch.randn(len(ctxs), 32, qlens[0], 128, device=DEV, dtype=BF16)
        k = torch.randn(len(ctxs), 8, ctxs[0], 128, device=DEV, dtype=BF16)
        v = torch.randn_like(k)
        causal = qlens[0] == ctxs[0]  # chunk vs prefix: an offset-causal mask has no flash path in SDPA
        t_sdpa = bench(
            lambda q=q, k=k, v=v, causal=causal: F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=True
            )
        )
        rows.append(f"{label:<34} | {t:9.4f} | {t_sdpa:13.4f}")
    return rows


def bench_elementwise() -> list[str]:
    rows = [f"{'op':<34} | {'triton ms':>9} | {'torch ms':>8}"]
    x = torch.randn(256, 4096, device=DEV, dtype=BF16)
    res, w = torch.randn_like(x), torch.randn(4096, device=DEV, dtype=BF16)

    def torch_fused():
        r = x + res
        var = r.float().pow(2).mean(-1, keepdim=True)
        return (r.float() * torch.rsqrt(var + 1e-6)).to(BF16) * w, r

    rows.append(
        f"{'fused_add_rms_norm 256x4096':<34} | {bench(lambda: rms_norm.fused_add_rms_norm(x, res, w, 1e-6)):9.4f} | "
        f"{bench(torch_fused):8.4f}"
    )
    gu = torch.randn(256, 2 * 14336, device=DEV, dtype=BF16)
    rows.append(
        f"{'silu_and_mul 256x14336':<34} | {bench(lambda: activation.silu_and_mul(gu)):9.4f} | "
        f"{bench(lambda: F.silu(gu[:, :14336]) * gu[:, 14336:]):8.4f}"
    )
    q, k, v = (torch.randn(256, n, 128, device=DEV, dtype=BF16) for n in (32, 8, 8))
    cache = torch.randn(2, 64, 16, 8, 128, device=DEV, dtype=BF16)
    slots, pos, table = torch.arange(256, device=DEV), torch.arange(256, device=DEV), cos_sin(8192, 128)

    def torch_rotary():
        for t in (q, k):
            cos, sin = table[pos].unsqueeze(1).chunk(2, -1)
            x1, x2 = t[..., :64].float(), t[..., 64:].float()
            t.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1))
        cache[0].view(-1, 8, 128).index_copy_(0, slots, k)
        cache[1].view(-1, 8, 128).index_copy_(0, slots, v)

    rows.append(
        f"{'rotary_and_cache T=256 H=32/8':<34} | "
        f"{bench(lambda: cache_ops.rotary_and_cache(q, k, v, pos, table, cache, slots)):9.4f} | "
        f"{bench(torch_rotary):8.4f}"
    )
    args = sampling_inputs(256, 128256, 1)
    no_sort = (args[0], args[1], None, None, args[4], args[5])
    t_triton = bench(lambda: sampling.top_k_top_p_min_p_sample(*no_sort))
    t_torch = bench(lambda: sampling.sample_torch(*no_sort))
    rows.append(f"{'sample B=256, no top-k/p (no sort)':<34} | {t_triton:9.4f} | {t_torch:8.4f}")
    for batch, vocab in ((64, 128256), (256, 128256)):
        args = sampling_inputs(batch, vocab, 1)
        t_triton = bench(lambda args=args: sampling.top_k_top_p_min_p_sample(*args))
        t_torch = bench(lambda args=args: sampling.sample_torch(*args))
        rows.append(f"{f'sample B={batch} V={vocab}':<34} | {t_triton:9.4f} | {t_torch:8.4f}")
        logits, temps, _, _, _, seeds = args
        t_triton = bench(
            lambda logits=logits, seeds=seeds, temps=temps: sampling.gumbel_argmax(logits, seeds, temps <= 0)
        )
        t_torch = bench(
            lambda logits=logits, seeds=seeds: (logits + sampling.gumbel_noise(seeds, logits.shape[1])).argmax(-1)
        )
        rows.append(f"{f'  noise+argmax only B={batch}':<34} | {t_triton:9.4f} | {t_torch:8.4f}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--no-bench", action="store_true")
    opts = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    say(f"device: {props.name}, {props.multi_processor_count} SMs")
    say(f"torch {torch.__version__}, triton {triton.__version__}")
    start = time.time()
    for check in (
        lambda: check_decode(opts.quick),
        check_decode_cuda_graph,
        lambda: check_prefill(opts.quick),
        check_cache_ops,
        check_norms,
        check_sampling,
    ):
        check()
    say(f"checks took {time.time() - start:.0f}s")
    tables: list[tuple[str, list[str]]] = []
    if not opts.no_bench:
        warm_gpu()
        for title, fn in (
            ("decode: Triton vs torch SDPA (bf16, H=32/8, D=128, block 16)", lambda: bench_decode(opts.quick)),
            ("decode kernel configs (H=32/8, D=128)", bench_decode_configs),
            ("prefill (bf16, H=32/8, D=128)", bench_prefill),
            ("elementwise and sampling", bench_elementwise),
        ):
            try:
                tables.append((title, fn()))
            except Exception:  # benchmarks are informative; a failure is logged and the rest still run
                say(f"[bench {title}] raised:\n{traceback.format_exc()}")
    say(f"total {time.time() - start:.0f}s")
    for title, rows in tables:
        say(f"\n## {title}")
        for row in rows:
            say(row)
    say(f"\n## correctness ({sum(r[5] for r in RESULTS)}/{len(RESULTS)} pass)")
    say(f"{'kernel':<19} {'case':<56} {'dtype':<8} {'max abs err':>11} {'rel err':>9}  result")
    for name, case, dtype, max_abs, rel, ok in RESULTS:
        say(f"{name:<19} {case:<56} {dtype:<8} {max_abs:11.2e} {rel:9.2e}  {'PASS' if ok else 'FAIL'}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "check_kernels.log").write_text("\n".join(LOG) + "\n")
    return 0 if all(r[5] for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
