"""`weir bench gguf`: GGUF weights kept packed (`--quantization gguf`) against dequantized at load.

  cpu MODEL   resident memory and single-stream decode tokens/s of one GGUF on the CPU; run it once with and once
              without --keep-quantized (each in its own process, so RSS is the model's); --write-q4km and
              --write-moe measure a random dense or mixture-of-experts model in a Q4_K_M mix instead
  gpu         the Triton dequantize-in-kernel matmul against bf16 F.linear on Llama-3.2-1B shapes, then decode
              tokens/s of a random 1B model in a Q4_K_M mix, packed against bf16, eager and under CUDA graphs

Decode runs through Weir's own engine core (scheduler, model runner, sampler) in this process, greedy, EOS ignored.
Correctness of the kernels is tested in tests/server/quant (`pytest -m gpu` on a GPU machine), not here.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from weir_bench.engines import engine_core, run_to_completion
from weir_bench.gguf_files import (
    CPU_MOE_SHAPE,
    CPU_SHAPE,
    LLAMA_32_1B,
    random_rows,
    write_random_moe_q4_k_m,
    write_random_q4_k_m,
)
from weir_bench.gpu import cuda_missing, greedy_agreement, save_report

PROMPT_TOKENS = 32


def engine_config(model: Any, batch: int, steps: int, eager: bool = True) -> Any:
    """An engine for up to `batch` streams with a KV pool just big enough for their prompts and `steps` tokens."""
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, SchedulerConfig

    blocks_per_stream = -(-(PROMPT_TOKENS + max(steps, 16) + 1) // 16) + 1
    return EngineConfig(
        model,
        CacheConfig(num_blocks=batch * blocks_per_stream + 1),
        SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * PROMPT_TOKENS)),
        ExecutorConfig(enforce_eager=eager, cuda_graph_max_batch=batch),
    )


def _prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, PROMPT_TOKENS), generator=gen).tolist()


def decode_rate(core: Any, batch: int, steps: int, seed: int) -> float:
    """Tokens/s of `batch` greedy streams each decoding `steps` tokens, timed from the step that gave every stream
    its first token (so prefill is left out)."""
    from weir_server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=steps + 1, min_tokens=steps + 1, ignore_eos=True, temperature=0.0)
    for i, prompt in enumerate(_prompts(batch, core.vocab_size, seed)):
        core.add_request(core.validate(GenerationRequest(f"decode-{seed}-{i}", prompt, params)))
    started, counted, have_first = 0.0, 0, set[str]()
    while core.has_unfinished():
        outputs = core.step()
        if len(have_first) < batch:
            have_first.update(out.request_id for out in outputs if out.token_ids)
            started = time.perf_counter()
            continue
        counted += sum(len(out.token_ids) for out in outputs)
    return counted / max(time.perf_counter() - started, 1e-9)


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table, numbers right-aligned."""
    align = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---" for i in range(len(head))]
    lines = [f"| {' | '.join(head)} |", f"|{'|'.join(align)}|"]
    lines += [f"| {' | '.join(_cell(v) for v in row)} |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


# ---- cpu ----------------------------------------------------------------------------------------------------


def rss_mib() -> dict[str, int]:
    """Resident MiB, all, anonymous (the heap: weights) and file-backed; freed heap goes back to the OS first."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the numbers just include freed heap
        pass
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) // 1024 for key in ("VmRSS", "RssAnon", "RssFile")}


def run_cpu(args: argparse.Namespace) -> int:
    """Load the GGUF, build an engine over it, time single-stream decode; print one row. RSS is read once the engine
    is built (bf16 weights packed for oneDNN, as a server does), anon MiB is what loading and that added."""
    from weir_server.config import ModelConfig
    from weir_server.models.loader import load_model
    from weir_server.models.registry import resolve_source

    if args.write_q4km is not None and not args.write_q4km.exists():
        write_random_q4_k_m(args.write_q4km, CPU_SHAPE)
    if args.write_moe is not None and not args.write_moe.exists():
        write_random_moe_q4_k_m(args.write_moe, CPU_MOE_SHAPE)
    model_path = str(args.write_q4km or args.write_moe or args.model)
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    config = ModelConfig(model_path, device="cpu", tokenizer=args.tokenizer, keep_quantized=args.keep_quantized)
    loaded = load_model(config, "generate")
    load_s = time.perf_counter() - started
    assert loaded.model is not None  # loaded with its weights
    held = {**dict(loaded.model.named_parameters()), **dict(loaded.model.named_buffers())}.values()
    tensors_mib = sum(t.numel() * t.element_size() for t in held) / 2**20  # as loaded, before any CPU packing
    core = engine_core(loaded, engine_config(config, 1, args.steps))  # packs bf16 weights for oneDNN, as a server would
    gc.collect()
    after = rss_mib()
    decode_rate(core, 1, 2, seed=1000)  # warm-up: first-call allocations and kernel choices stay out of the rows
    speeds = [decode_rate(core, 1, args.steps, seed) for seed in range(args.repeats)]
    source = resolve_source(model_path)
    file_mib = (source.directory / str(source.gguf_file)).stat().st_size / 2**20 if source.is_gguf else float("nan")
    head = ["model", "weights", "dtype", "file MiB", "tensors MiB", "RSS MiB", "anon MiB (model)", "load s",
            "decode tok/s (median)", "all repeats"]  # fmt: skip
    row = [
        Path(model_path).name, "packed" if args.keep_quantized else "dequantized at load",
        str(loaded.dtype).removeprefix("torch."), file_mib, tensors_mib, float(after["VmRSS"]),
        float(after["RssAnon"] - before["RssAnon"]), load_s, statistics.median(speeds),
        ", ".join(f"{s:.2f}" for s in speeds),
    ]  # fmt: skip
    print(f"{os.cpu_count()} CPU cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{args.steps} decode steps after a {PROMPT_TOKENS}-token prompt, {args.repeats} repeats")  # fmt: skip
    print(table(head, [row]))
    return 0


# ---- gpu ----------------------------------------------------------------------------------------------------


def matmul_rows() -> list[dict[str, Any]]:
    """The packed matmul (planes, its default path) against bf16 F.linear on the dequantized weights, at 1 to 256
    rows; with WEIR_BENCH_TILE_SWEEP=1 also other tilings of the in-kernel path and the dequantizing one."""
    import torch
    import torch.nn.functional as F
    import triton.testing

    from weir_server.kernels.gguf_dequant import Q4_0, Q4_K, Q6_K, Q8_0
    from weir_server.kernels.gguf_matmul import TileConfig, dequantize_matmul, gguf_matmul
    from weir_server.kernels.gguf_planes import dequantize_planes, to_planes

    sweep = os.environ.get("WEIR_BENCH_TILE_SWEEP") == "1"
    decode_tiles = [(16, 16, 256, 1), (16, 16, 256, 2), (16, 32, 256, 2), (16, 32, 256, 4), (16, 64, 128, 1)]
    batch_tiles = [(32, 64, 128, 1), (64, 64, 128, 1), (64, 128, 64, 1), (32, 32, 256, 1)]
    s = LLAMA_32_1B
    rows = []
    for layer, (n, k) in {
        "gate_up": (2 * s.ffn, s.hidden),
        "o": (s.hidden, s.hidden),
        "down": (s.hidden, s.ffn),
        "lm_head": (s.vocab, s.hidden),
    }.items():
        for qtype in (Q4_K, Q6_K, Q4_0, Q8_0) if layer == "gate_up" else (Q4_K, Q6_K):
            raw = random_rows(qtype, n, k, scale=1e-4).cuda()
            planes = to_planes(raw, qtype)
            held = sum(t.numel() * t.element_size() for t in planes.tensors().values())
            dense = dequantize_planes(planes).to(torch.bfloat16)
            for m in (1, 16, 32, 64, 256):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                want = x.double() @ dense.double().t()
                paths: list[tuple[str, Any]] = [("default", lambda x=x, p=planes: gguf_matmul(x, p))]
                if sweep:
                    paths += [(str(t), lambda x=x, p=planes, t=t: gguf_matmul(x, p, TileConfig(*t, 4, 3)))
                              for t in (decode_tiles if m <= 16 else batch_tiles)]  # fmt: skip
                    if m > 16:
                        paths.append(("dequantize", lambda x=x, p=planes: dequantize_matmul(x, p)))
                t_d = triton.testing.do_bench(lambda x=x, dense=dense: F.linear(x, dense), return_mode="median")
                for name, fn in paths:
                    row = dict(layer=layer, qtype=qtype.name, m=m, tiles=name, bf16_ms=t_d, note="")
                    try:
                        err = ((fn().double() - want).norm() / want.norm()).item()
                        t_q = triton.testing.do_bench(fn, return_mode="median")
                        row.update(packed_ms=t_q, packed_gbps=held / t_q / 1e6, rel_err=err)
                    except Exception as exc:  # a tiling the compiler refuses is a row, not a failed bench
                        row.update(packed_ms=float("nan"), packed_gbps=float("nan"), rel_err=float("nan"),
                                   note=type(exc).__name__)  # fmt: skip
                    rows.append(row)
            del raw, planes, dense
            torch.cuda.empty_cache()
    return rows


def decode_rows(label: str, model: Any, steps: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Decode tok/s of one model at batch 1 and 32, eager and under CUDA graphs; and notes: whether the graphed
    engine's greedy tokens match the eager one's, or why its graphs could not be captured."""
    import torch

    from weir_server.engine.types import GenerationRequest, SamplingParams
    from weir_server.models.loader import load_model

    loaded = load_model(model, "generate")
    weights_gib = torch.cuda.memory_allocated() / 2**30
    params = SamplingParams(max_tokens=16, min_tokens=16, ignore_eos=True, temperature=0.0)
    prompts = _prompts(4, loaded.vocab_size, 7)
    rows, notes, greedy = [], [], {}
    for mode in ("eager", "CUDA graphs"):
        try:
            core = engine_core(loaded, engine_config(model, 32, steps, eager=mode == "eager"))
        except Exception as exc:  # a failed capture is a result here; the eager rows still stand
            notes.append(f"{label}, {mode}: engine failed to start: {type(exc).__name__}: {exc}"[:400])
            continue
        for batch in (1, 32):
            rate = decode_rate(core, batch, steps, seed=batch)
            rows.append(dict(model=label, weights_gib=weights_gib, mode=mode, batch=batch, tok_s=rate,
                             ms_per_step=batch / rate * 1e3))  # fmt: skip
        greedy[mode] = run_to_completion(
            core, [GenerationRequest(f"greedy-{i}", p, params) for i, p in enumerate(prompts)]
        )
        del core
        gc.collect()
        torch.cuda.empty_cache()
    if len(greedy) == 2:
        same = greedy_agreement(greedy["eager"], greedy["CUDA graphs"])
        notes.append(f"{label}: greedy under CUDA graphs = eager for {same['identical']}/{same['prompts']} prompts "
                     f"(16 tokens each)")  # fmt: skip
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    return rows, notes


def decode_table(rows: list[dict[str, Any]], notes: list[str], steps: int) -> str:
    """The decode rows as one table, the notes after it."""
    head = ["model", "weights GiB", "mode", "batch", "tok/s", "ms/step"]
    keys = ("model", "weights_gib", "mode", "batch", "tok_s", "ms_per_step")
    title = f"## decode, random 1B in a Q4_K_M mix ({steps} steps after {PROMPT_TOKENS}-token prompts, greedy)"
    return "\n".join([title, table(head, [[r[k] for k in keys] for r in rows]), *notes])


def run_gpu(args: argparse.Namespace) -> int:
    """The matmul table, then the decode table last; 1 when a section raised (the other still runs)."""
    import torch

    from weir_server.config import ModelConfig

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    failed, report, rows = False, [], []
    try:
        mm = matmul_rows()
        head = ["layer", "qtype", "rows", "tiles", "packed ms", "bf16 ms", "packed GB/s", "rel. error", "note"]
        keys = ("layer", "qtype", "m", "tiles", "packed_ms", "bf16_ms", "packed_gbps", "rel_err", "note")
        title = "## packed matmul vs bf16 F.linear on dequantized weights (Llama-3.2-1B shapes, do_bench median)"
        report += [title, table(head, [[r[k] for k in keys] for r in mm])]
        rows += [{"kind": "matmul", **r} for r in mm]
    except Exception:  # benchmarks are informative: show it and still measure decode
        failed, report = True, [*report, f"matmul raised:\n{traceback.format_exc()}"]
    print("\n".join(report), flush=True)
    decode: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_q4_k_m(Path(tmp) / f"{LLAMA_32_1B.name}.gguf", LLAMA_32_1B)
        print(f"wrote {path.name}: {path.stat().st_size / 2**20:.0f} MiB", flush=True)
        base = ModelConfig(str(path), device="cuda", dtype="bfloat16", max_model_len=1024)
        for label, model in (
            ("Q4_K_M packed", replace(base, keep_quantized=True)),
            ("bf16 (dummy weights)", replace(base, load_format="dummy")),
        ):
            try:
                more, said = decode_rows(label, model, args.steps)
                decode, notes = decode + more, notes + said
            except Exception:
                failed = True
                report.append(f"{label} decode raised:\n{traceback.format_exc()}")
                print(report[-1], flush=True)
    last = decode_table(decode, notes, args.steps)
    print(last, flush=True)
    save_report(args.out_dir, "gguf", "\n".join([*report, last]), rows + [{"kind": "decode", **r} for r in decode])
    return 1 if failed else 0


def build_parser(prog: str = "weir bench gguf") -> argparse.ArgumentParser:
    """The verbs of `weir bench gguf` and their options."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{cpu,gpu}")
    cpu = sub.add_parser("cpu", help="CPU: RSS and single-stream decode tok/s of one GGUF")
    cpu.add_argument("model", nargs="?", help="a GGUF file (or a packaged model's short name)")
    cpu.add_argument("--tokenizer", help="a tokenizer folder (default: the model's own or one beside it)")
    cpu.add_argument("--keep-quantized", action="store_true", help="blocks kept packed, as `--quantization gguf`")
    cpu.add_argument("--write-q4km", type=Path, metavar="PATH",
                     help="measure a random 12-layer Q4_K_M-style model at PATH, written first if missing")  # fmt: skip
    cpu.add_argument("--write-moe", type=Path, metavar="PATH",
                     help="a random 8-layer Qwen3-MoE, Q4_K_M mix, at PATH (written first if missing)")  # fmt: skip
    cpu.add_argument("--steps", type=int, default=16, help="decode steps timed per repeat (default %(default)s)")
    cpu.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default %(default)s)")
    gpu = sub.add_parser("gpu", help="GPU: packed matmul vs bf16, decode of a random 1B Q4_K_M packed vs bf16")
    gpu.add_argument("--steps", type=int, default=32, help="decode steps timed per row (default %(default)s)")
    gpu.add_argument("--out-dir", type=Path, help="also write the tables to OUT_DIR/gguf.md and the rows as gguf.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb of `weir bench gguf`; 2 on a usage error or, for gpu, without a CUDA device."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or getattr(args, "repeats", 1) < 1:
        parser.error("--steps and --repeats must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "cpu":
        if sum(x is not None for x in (args.model, args.write_q4km, args.write_moe)) != 1:
            parser.error("cpu: give MODEL, --write-q4km PATH or --write-moe PATH (one of them)")
        return run_cpu(args)
    if reason := cuda_missing("weir bench gguf gpu"):
        print(reason, file=sys.stderr)
        return 2
    return run_gpu(args)
