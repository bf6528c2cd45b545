"""`weir bench gpu`: Weir on a GPU against Hugging Face transformers, one workload, one table, a few minutes.

For each model shape (SmolLM2-135M, Llama-3.2-1B; random weights): Weir's engine in-process, `weir serve` over
gRPC with N concurrent streams (a subprocess on loopback, `--load-format dummy`), Weir at batch 1, then HF
`generate` at batch 1 and static batch 256 and HF `generate_batch` (continuous batching), all on the same GPU.

    weir bench gpu tokenizer --out DIR                       # CPU: the SmolLM2 tokenizer from the packaged GGUF
    weir bench gpu reference --tokenizer DIR --out ref.json  # CPU: greedy tokens of the CPU path
    weir bench gpu run --tokenizer DIR [--reference ref.json] [--out-dir DIR]
    weir bench gpu greedy --model FILE.gguf --reference ref.json
    weir bench gpu sampling --tokenizer DIR                  # sampled vs greedy decoding in the engine core

On a machine where the packages are not installed: PYTHONPATH=client:server:gateway:bench python -m
weir_bench gpu ... (bench/RESULTS.md, "Running the GPU benchmarks").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from weir_bench.floor import Floor, ModelCost, gpu_peak, row_floor
from weir_bench.gpu import SHAPES, cuda_missing, save_report
from weir_bench.gpu_targets import WARMUP_REQUESTS, Measured
from weir_bench.report import Row

logger = logging.getLogger("weir_bench.gpu")
TableRow = tuple[str, Row, float | None, Floor | None]  # shape, row, peak GPU MiB, what the GPU allows the row


def table(rows: list[TableRow]) -> str:
    """The Markdown table of bench/RESULTS.md's GPU sections."""
    head = (
        "| shape | target | conc. | ok/err | output tok/s | floor tok/s (reached) | TTFT p50 / p99 ms | "
        "ITL p50 / p99 ms | ITL floor ms | peak GPU MiB |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for shape, row, mem, floor in rows:
        tput = row.output_tokens_per_s
        bound = "" if floor is None else f"{floor.output_tokens_per_s:,.0f} ({tput / floor.output_tokens_per_s:.0%})"
        lines.append(
            f"| {shape} | {row.target} | {row.concurrency} | {row.requests}/{row.errors} | {tput:,.0f} | {bound} | "
            f"{row.ttft_p50_ms:,.1f} / {row.ttft_p99_ms:,.1f} | {row.itl_p50_ms:,.2f} / {row.itl_p99_ms:,.2f} | "
            f"{'' if floor is None else f'{floor.itl_ms:.2f}'} | {'' if mem is None else f'{mem:,.0f}'} |"
        )
    return "\n".join(lines)


def ratios(rows: list[TableRow]) -> list[str]:
    """gRPC against HF static batch 256 and against in-process, and batch 1 against HF batch 1, per shape."""
    by = {(shape, row.target.split(" (")[0]): row.output_tokens_per_s for shape, row, _, _ in rows}
    lines = []
    for shape in dict.fromkeys(s for s, _, _, _ in rows):
        inproc = by.get((shape, "weir in-process"))
        static, hf1 = by.get((shape, "HF generate static batch 256")), by.get((shape, "HF generate batch 1"))
        b1 = by.get((shape, "weir gRPC batch 1")) or by.get((shape, "weir in-process batch 1"))
        for _, row, _, _ in (r for r in rows if r[0] == shape and r[1].target.startswith("weir gRPC (")):
            grpc, parts = row.output_tokens_per_s, []
            if static:
                parts.append(f"gRPC / HF static-256 = {grpc / static:.1f}x")
            if inproc:
                parts.append(f"gRPC / in-process = {grpc / inproc:.0%}")
            lines.append(f"{shape}, {row.target}: " + ", ".join(parts))
        if b1 and hf1:
            lines.append(f"{shape}: batch-1 Weir / HF = {b1 / hf1:.1f}x")
    return lines


async def _measure_shape(name: str, model_dir: Path, args: argparse.Namespace, notes: list[str]) -> list[TableRow]:
    """Every target of one shape, in order; a failing target becomes a note and the others still run."""
    import torch

    from weir_bench.gpu_targets import hf_rows, weir_grpc, weir_inprocess
    from weir_bench.load import make_prompts

    shape = SHAPES[name]
    gpu, cost = gpu_peak(torch.cuda.get_device_name()), ModelCost.of(shape.config)
    prompts = make_prompts(args.num_requests + WARMUP_REQUESTS, args.prompt_tokens, shape.config["vocab_size"], seed=0)
    # The in-process engine is one GPU's; with -tp > 1 only the server has the workers.
    inprocess = not args.skip_inprocess and args.tensor_parallel_size == 1
    targets = [*(["in-process"] if inprocess else []), *(f"gRPC {c}" for c in args.engine_cores)]
    targets += [] if args.skip_hf else ["HF"]
    rows: list[TableRow] = []
    for label in targets:
        started = time.perf_counter()
        try:
            produced: list[Measured]
            if label == "in-process":
                produced = await weir_inprocess(model_dir, args, prompts)
            elif label.startswith("gRPC"):
                produced = await weir_grpc(model_dir, args, prompts, label.split()[1])
            else:
                produced = await asyncio.to_thread(hf_rows, shape, args, prompts)
            for row, mem in produced:
                floor = (
                    None
                    if gpu is None
                    else row_floor(cost, gpu, row.concurrency, args.prompt_tokens, args.output_tokens)
                )
                rows.append((name, row, mem, floor))
                print(table([rows[-1]]).splitlines()[-1], flush=True)
        except Exception:
            logger.exception("%s %s failed", name, label)
            notes.append(f"{name} {label} FAILED: " + traceback.format_exc(limit=4).replace("\n", " | "))
        logger.warning("%s %s took %.0fs", name, label, time.perf_counter() - started)
    return rows


async def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """The greedy check (with --reference), then every shape's targets; prints the report, writes it to --out-dir."""
    import torch

    from weir_bench.gpu import write_model_dir
    from weir_bench.greedy import greedy_check, greedy_shape

    work = Path(tempfile.mkdtemp(prefix="weir-gpu-bench-"))
    device = torch.cuda.get_device_name()
    peak = gpu_peak(device)
    notes: list[str] = [f"device: {device}, torch {torch.__version__}"]
    notes.append(
        "floor: not known for this GPU (bench/weir_bench/floor.py's table)"
        if peak is None
        else f"floor ({peak.name}: {peak.bytes_per_s / 1e12:.2f} TB/s, {peak.flops / 1e12:.0f} TFLOP/s bf16): each "
        "decode step reads the weights and the batch's KV once and does 2 x params FLOPs a token; one prefill of "
        "the batch (bench/weir_bench/floor.py)"
    )
    if args.reference:
        try:
            notes += greedy_check(write_model_dir(greedy_shape(), args.tokenizer, work / "greedy"), args.reference)
        except Exception:
            logger.exception("greedy check failed")
            notes.append("greedy check FAILED: " + traceback.format_exc(limit=3).replace("\n", " | "))
    rows: list[TableRow] = []
    for name in args.shapes:
        rows += await _measure_shape(name, write_model_dir(SHAPES[name], args.tokenizer, work / name), args, notes)
    report = "\n".join([
        f"# Weir GPU benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"command: weir bench gpu {shlex.join(argv)}",
        f"workload: {args.num_requests} requests x {args.prompt_tokens} random prompt tokens -> "
        f"{args.output_tokens} output tokens (EOS ignored, greedy), bf16, random weights; host {platform.node()}",
        *notes, "", table(rows), "", *ratios(rows),
    ])  # fmt: skip
    print("\n" + report, flush=True)
    save_report(
        args.out_dir,
        "gpu",
        report,
        [
            {"shape": s, **r.__dict__, "peak_gpu_mib": m, "floor_tokens_per_s": f and f.output_tokens_per_s}
            for s, r, m, f in rows
        ],
    )
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True, help="a folder with the SmolLM2 tokenizer")
    p.add_argument("--reference", type=Path, help="greedy tokens from `weir bench gpu reference`")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--batch1-requests", type=int, default=4)
    p.add_argument("--hf-batch1-requests", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-run-ahead", action="store_true", help="the server reads each step's tokens first")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-inprocess", action="store_true", help="only the gRPC (and HF) rows")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="the gRPC server's -tp (GPUs of this host)")
    p.add_argument(
        "--engine-cores",
        nargs="+",
        default=["process", "thread"],
        choices=["process", "thread"],
        help="gRPC rows: the server's --engine-core modes to run (default: both)",
    )
    p.add_argument(
        "--compare-gil-switch",
        type=float,
        default=0.005,
        help="also run in-process at this GIL switch interval (0: don't)",
    )
    p.add_argument("--skip-hf-continuous", action="store_true")
    p.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="also run the gRPC load from this many client processes (1: only the one-process row)",
    )
    p.add_argument(
        "--py-spy", help="path of a py-spy binary: profile the gRPC server's processes under load (into --out-dir)"
    )
    p.add_argument("--out-dir", type=Path, help="also write the report to OUT_DIR/gpu.md and the rows to gpu.json")


def build_parser(prog: str = "weir bench gpu") -> argparse.ArgumentParser:
    """The verbs of `weir bench gpu` and their options."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,reference,greedy,sampling,tokenizer}")
    _add_run_options(sub.add_parser("run", help="GPU: the benchmark (and the greedy check with --reference)"))
    ref = sub.add_parser("reference", help="CPU: greedy tokens of the SmolLM2 shape's dummy weights")
    ref.add_argument("--tokenizer", type=Path, required=True, help="a folder with the SmolLM2 tokenizer")
    ref.add_argument("--out", type=Path, required=True)
    ref.add_argument("--model", type=Path, help="real weights (a .gguf file) instead of the dummy SmolLM2 shape")
    greedy = sub.add_parser("greedy", help="GPU: only the greedy check, on real weights (a .gguf file)")
    greedy.add_argument("--model", type=Path, required=True)
    greedy.add_argument("--reference", type=Path, required=True, help="from `reference --model` on the CPU")
    greedy.add_argument("--out-dir", type=Path, help="also write the lines to OUT_DIR/greedy.md")
    sampling = sub.add_parser("sampling", help="GPU: sampled vs greedy decoding speed in the engine core")
    sampling.add_argument("--tokenizer", type=Path, required=True, help="a folder with the SmolLM2 tokenizer")
    tok = sub.add_parser("tokenizer", help="CPU: write the SmolLM2 tokenizer (from a GGUF) to a folder")
    tok.add_argument("--out", type=Path, required=True, help="the folder to write (e.g. .gpu_assets/tokenizer)")
    tok.add_argument("--gguf", type=Path, help="the GGUF to read it from (default: the packaged SmolLM2)")
    return parser


def _write_tokenizer(gguf: Path | None, out: Path) -> None:
    from transformers import AutoTokenizer

    from weir_bench.peers import default_gguf

    gguf = gguf or default_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb of `weir bench gpu`; 0 on success, 2 where a GPU verb finds no CUDA device."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.py_spy and args.out_dir is None:
        parser.error("--py-spy writes its profiles to --out-dir; give one")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command in ("run", "greedy", "sampling") and (reason := cuda_missing(f"weir bench gpu {args.command}")):
        print(reason, file=sys.stderr)
        return 2
    if args.command == "run":
        return asyncio.run(run(args, argv))
    if args.command == "reference":
        from weir_bench.gpu import write_model_dir
        from weir_bench.greedy import greedy_shape, write_reference

        work = Path(tempfile.mkdtemp(prefix="weir-greedy-"))
        write_reference(args.tokenizer, args.model or write_model_dir(greedy_shape(), args.tokenizer, work), args.out)
        print(f"wrote {args.out}")
    elif args.command == "greedy":
        from weir_bench.greedy import greedy_check

        save_report(args.out_dir, "greedy", "\n".join(greedy_check(args.model, args.reference)))
    elif args.command == "sampling":
        from weir_bench.sampling import measure, table

        print("\n" + table(measure(args.tokenizer)), flush=True)
    else:
        _write_tokenizer(args.gguf, args.out)
        print(f"wrote {args.out}")
    return 0
