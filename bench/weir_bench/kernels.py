"""`weir bench kernels`: Weir's Triton kernels against the torch paths they replace, on a GPU (bf16, H=32/8,
D=128 unless a row says otherwise; medians of triton.testing.do_bench, milliseconds).

Imports only torch, triton and weir_server.kernels. Their correctness against the float64 references is tested
in tests/server/kernels (`pytest -m gpu` on a GPU machine).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from weir_bench.gpu import cuda_missing, save_report

DEV = "cuda"
PREFILL_CONFIGS = [  # (block_m, block_n, num_warps, num_stages) the prefill table compares
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 2),
]


def bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def warm_gpu() -> None:
    """Run the clocks up first, so the first table row is not measured on an idle GPU."""
    import torch

    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    for _ in range(100):
        a @ a
    torch.cuda.synchronize()


def gathered_sdpa(q: Any, kv_cache: Any, block_tables: Any, max_ctx: int, scale: float) -> Any:
    """The torch path's decode: gather the blocks, then SDPA over [B, Hkv, L, D] with GQA."""
    import torch.nn.functional as F

    bs = kv_cache.shape[2]
    k = kv_cache[0][block_tables[:, : -(-max_ctx // bs)].long()].flatten(1, 2)[:, :max_ctx]
    v = kv_cache[1][block_tables[:, : -(-max_ctx // bs)].long()].flatten(1, 2)[:, :max_ctx]
    return F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, enable_gqa=True
    )


def bench_decode(quick: bool) -> list[str]:
    import torch
    import torch.nn.functional as F

    from weir_server.kernels.decode_attention import paged_decode_attention
    from weir_server.kernels.testing import random_paged_batch

    h, hkv, d = 32, 8, 128
    head = f"{'B':>4} {'ctx':>5} | {'triton ms':>9} {'GB/s':>6} | {'gather+sdpa ms':>14} | {'sdpa only ms':>12}"
    rows = [head + " | speedup"]
    for b in (1, 7, 64, 256):
        for ctx in (512, 4096):
            if quick and b in (7, 64):
                continue
            batch = random_paged_batch([ctx] * b, [1] * b, h, hkv, d, 16, torch.bfloat16, DEV, seed=b + ctx)
            args = (batch.q, batch.kv_cache, batch.block_tables, batch.context_lens, d**-0.5)
            t_triton = bench(lambda args=args, ctx=ctx: paged_decode_attention(*args, max_context_len=ctx))
            t_torch = bench(
                lambda batch=batch, ctx=ctx: gathered_sdpa(batch.q, batch.kv_cache, batch.block_tables, ctx, d**-0.5)
            )
            blocks = batch.block_tables[:, : ctx // 16].long()
            k = batch.kv_cache[0][blocks].flatten(1, 2).transpose(1, 2).contiguous()
            v = batch.kv_cache[1][blocks].flatten(1, 2).transpose(1, 2).contiguous()
            t_sdpa = bench(
                lambda k=k, v=v, q=batch.q: F.scaled_dot_product_attention(
                    q.unsqueeze(2), k, v, scale=d**-0.5, enable_gqa=True
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
    import torch

    from weir_server.kernels.decode_attention import decode_attention
    from weir_server.kernels.testing import random_paged_batch

    rows = [f"{'B':>4} {'ctx':>5} {'block_n':>7} {'warps':>5} {'partition':>9} | ms"]
    for b, ctx in ((1, 4096), (7, 4096), (64, 4096)):
        batch = random_paged_batch([ctx] * b, [1] * b, 32, 8, 128, 16, torch.bfloat16, DEV, seed=9)
        kc, vc = batch.kv_cache[0], batch.kv_cache[1]
        for block_n, warps, part in (
            (32, 4, None), (64, 4, None), (128, 4, None), (64, 8, None), (128, 8, None), (64, 4, 256),
            (64, 4, 1024), (64, 4, 0),
        ):  # fmt: skip
            call = (batch.q, kc, vc, batch.block_tables, batch.context_lens, 0.088, None, ctx, part, block_n, warps)
            t = bench(lambda call=call: decode_attention(*call))
            rows.append(f"{b:>4} {ctx:>5} {block_n:>7} {warps:>5} {str(part):>9} | {t:.4f}")
    return rows


def bench_prefill() -> list[str]:
    import torch
    import torch.nn.functional as F

    from weir_server.kernels.prefill_attention import paged_prefill_attention, prefill_attention
    from weir_server.kernels.testing import random_paged_batch

    bf16 = torch.bfloat16
    rows = [f"{'case':<34} | {'triton ms':>9} | {'flash sdpa ms':>13}"]
    for label, ctxs, qlens in (
        ("1 x 4096 prompt", [4096], [4096]),
        ("8 x 512-token chunks, ctx 2048", [2048] * 8, [512] * 8),
    ):
        batch = random_paged_batch(ctxs, qlens, 32, 8, 128, 16, bf16, DEV, seed=3)
        meta = (batch.block_tables, batch.context_lens, batch.query_start_loc, batch.max_query_len, 0.088)
        t = bench(lambda meta=meta, batch=batch: paged_prefill_attention(batch.q, batch.kv_cache, *meta))
        for block_m, block_n, warps, stages in PREFILL_CONFIGS:
            call = (batch.q, batch.kv_cache[0], batch.kv_cache[1], *meta, None, block_m, block_n, warps, stages)
            t_cfg = bench(lambda call=call: prefill_attention(*call))
            rows.append(f"  {label:<32} m={block_m} n={block_n} warps={warps} stages={stages} | {t_cfg:.4f}")
        q = torch.randn(len(ctxs), 32, qlens[0], 128, device=DEV, dtype=bf16)
        k = torch.randn(len(ctxs), 8, ctxs[0], 128, device=DEV, dtype=bf16)
        v = torch.randn_like(k)
        causal = qlens[0] == ctxs[0]  # chunk vs prefix: an offset-causal mask has no flash path in SDPA
        t_sdpa = bench(
            lambda q=q, k=k, v=v, causal=causal: F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=True
            )
        )
        rows.append(f"{label:<34} | {t:9.4f} | {t_sdpa:13.4f}")
    return rows


def rope_table(max_pos: int, rot: int) -> Any:
    """cos | sin of each position, as the rotary kernels take it."""
    import torch

    inv = 1.0 / 500000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=DEV) / rot)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=DEV), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def sampling_inputs(batch: int, vocab: int, seed: int) -> tuple[Any, ...]:
    """Logits and per-row parameters with every filter mixed in (greedy, top-k, top-p, min-p rows)."""
    import torch

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


def bench_elementwise() -> list[str]:
    import torch
    import torch.nn.functional as F

    from weir_server.kernels import activation, cache_ops, rms_norm, sampling

    bf16 = torch.bfloat16
    rows = [f"{'op':<34} | {'triton ms':>9} | {'torch ms':>8}"]
    x = torch.randn(256, 4096, device=DEV, dtype=bf16)
    res, w = torch.randn_like(x), torch.randn(4096, device=DEV, dtype=bf16)

    def torch_fused() -> tuple[Any, Any]:
        r = x + res
        var = r.float().pow(2).mean(-1, keepdim=True)
        return (r.float() * torch.rsqrt(var + 1e-6)).to(bf16) * w, r

    fused = bench(lambda: rms_norm.fused_add_rms_norm(x, res, w, 1e-6))
    rows.append(f"{'fused_add_rms_norm 256x4096':<34} | {fused:9.4f} | {bench(torch_fused):8.4f}")
    gu = torch.randn(256, 2 * 14336, device=DEV, dtype=bf16)
    rows.append(
        f"{'silu_and_mul 256x14336':<34} | {bench(lambda: activation.silu_and_mul(gu)):9.4f} | "
        f"{bench(lambda: F.silu(gu[:, :14336]) * gu[:, 14336:]):8.4f}"
    )
    q, k, v = (torch.randn(256, n, 128, device=DEV, dtype=bf16) for n in (32, 8, 8))
    cache = torch.randn(2, 64, 16, 8, 128, device=DEV, dtype=bf16)
    slots, pos, table = torch.arange(256, device=DEV), torch.arange(256, device=DEV), rope_table(8192, 128)

    def torch_rotary() -> None:
        for t in (q, k):
            cos, sin = table[pos].unsqueeze(1).chunk(2, -1)
            x1, x2 = t[..., :64].float(), t[..., 64:].float()
            t.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1))
        cache[0].view(-1, 8, 128).index_copy_(0, slots, k)
        cache[1].view(-1, 8, 128).index_copy_(0, slots, v)

    rotary = bench(lambda: cache_ops.rotary_and_cache(q, k, v, pos, table, cache, slots))
    rows.append(f"{'rotary_and_cache T=256 H=32/8':<34} | {rotary:9.4f} | {bench(torch_rotary):8.4f}")
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


# The Llama-3.2-1B shape's LoRA layers: (input features, output slices).
LORA_LAYERS = {"qkv": (2048, (2048, 512, 512)), "o": (2048, (2048,)), "gate_up": (2048, (8192, 8192)),
               "down": (8192, (2048,))}  # fmt: skip


def host_us(fn: Callable[[], object], iters: int = 200) -> float:
    """Microseconds of host time per call, launched back to back without a sync (what an eager step pays)."""
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed / iters * 1e6


def bench_lora() -> list[str]:
    """The grouped (SGMV) LoRA kernels beside the base matmul they add to, rank 16 over 16 slots, at a decode
    step's rows (256) and a prefill step's (2048): device time, and the host time one call costs an eager step."""
    import torch

    from weir_server.kernels.lora import SGMV_BLOCK_T, host_segments, lora_apply_sgmv, lora_segments, split_segments

    bf16, rank, slots_n = torch.bfloat16, 16, 16
    rows = [f"{'layer':<16} | {'base ms':>8} | {'1 adapter ms':>12} | {'16 adapters ms':>14} | {'host us/call':>12}"]
    for tokens in (256, 2048):
        for name, (k, slices) in LORA_LAYERS.items():
            n = sum(slices)
            x, w = torch.randn(tokens, k, device=DEV, dtype=bf16), torch.randn(n, k, device=DEV, dtype=bf16) * 0.02
            out = torch.empty(tokens, n, device=DEV, dtype=bf16)
            a = torch.randn(slots_n, len(slices) * rank, k, device=DEV, dtype=bf16) * 0.02
            b = torch.randn(slots_n, n, rank, device=DEV, dtype=bf16) * 0.02
            offsets = [torch.full((size,), i * rank, dtype=torch.int32) for i, size in enumerate(slices)]
            row_offset = torch.cat(offsets).to(DEV)
            ranks = torch.full((slots_n,), rank, dtype=torch.int32, device=DEV)
            times = []
            for used in (1, 16):
                slots = (torch.arange(tokens, device=DEV) * used // tokens).to(torch.int32)
                seg = lora_segments(slots, slots_n, SGMV_BLOCK_T)

                apply = functools.partial(lora_apply_sgmv, x, out, a, b, slots, row_offset, 64, seg, ranks)
                times.append(bench(apply))
            base = bench(lambda x=x, w=w, out=out: torch.matmul(x, w.t(), out=out))
            host = host_us(apply)
            rows.append(
                f"{f'T={tokens} {name}':<16} | {base:8.4f} | {times[0]:12.4f} | {times[1]:14.4f} | {host:12.1f}"
            )
    slots = torch.zeros(2048, dtype=torch.int32, device=DEV)
    rows.append(
        f"lora_segments (once a CUDA-graph capture): "
        f"{host_us(lambda: lora_segments(slots, slots_n, SGMV_BLOCK_T)):.1f} us host"
    )
    seq_slots, seq_lens = list(range(-1, slots_n)), [2048 // (slots_n + 1)] * (slots_n + 1)

    def eager_step_slots() -> None:  # what an eager step with adapters does once (LoRAState.set_tokens)
        packed = torch.from_numpy(host_segments(seq_slots, seq_lens, slots_n, SGMV_BLOCK_T))
        split_segments(packed.pin_memory().to(DEV, non_blocking=True), sum(seq_lens), slots_n)

    rows.append(f"host_segments + one copy (once an eager step): {host_us(eager_step_slots):.1f} us host")
    return rows


SECTIONS = ("decode", "decode-configs", "prefill", "elementwise", "lora")


def build_parser(prog: str = "weir bench kernels") -> argparse.ArgumentParser:
    """The options of `weir bench kernels`."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer decode shapes")
    p.add_argument("--out-dir", type=Path, help="also write the tables to OUT_DIR/kernels.md")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `weir bench kernels`: print each table; 1 when one of them raised (the others still run), 2 without
    a CUDA device."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    wanted = [name.strip() for name in args.sections.split(",") if name.strip()]
    if unknown := sorted(set(wanted) - set(SECTIONS)):
        print(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if reason := cuda_missing("weir bench kernels"):
        print(reason, file=sys.stderr)
        return 2
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    lines = [f"device: {props.name}, {props.multi_processor_count} SMs", f"torch {torch.__version__}, "
             f"triton {triton.__version__}"]  # fmt: skip
    print("\n".join(lines), flush=True)
    started, failed = time.time(), False
    warm_gpu()
    sections = {
        "decode": ("decode: Triton vs torch SDPA (bf16, H=32/8, D=128, block 16)", lambda: bench_decode(args.quick)),
        "decode-configs": ("decode kernel configs (H=32/8, D=128)", bench_decode_configs),
        "prefill": ("prefill (bf16, H=32/8, D=128)", bench_prefill),
        "elementwise": ("elementwise and sampling", bench_elementwise),
        "lora": ("LoRA (SGMV), Llama-3.2-1B layers, rank 16, 16 slots", bench_lora),
    }
    for title, make in (sections[name] for name in wanted):
        try:
            section = ["", f"## {title}", *make()]
        except Exception:  # benchmarks are informative; a failure is shown and the rest still run
            section, failed = ["", f"## {title}", f"raised:\n{traceback.format_exc()}"], True
        print("\n".join(section), flush=True)
        lines += section
    lines.append(f"\ntotal {time.time() - started:.0f}s")
    print(lines[-1], flush=True)
    save_report(args.out_dir, "kernels", "\n".join(lines))
    return 1 if failed else 0
