"""Weir on a GPU against Hugging Face transformers: one workload, one table, one run of a few minutes.

For each model shape (SmolLM2-135M, Llama-3.2-1B; random weights): Weir's engine in-process, `weir serve` over
gRPC with N concurrent streams (a subprocess on loopback, `--load-format dummy`), Weir at batch 1, then HF
`generate` at batch 1 and static batch 256 and HF `generate_batch` (continuous batching), all on the same GPU.

    python scripts/gpu_bench.py reference --out ref.json          # CPU: greedy tokens of the CPU path
    python scripts/gpu_bench.py run --tokenizer DIR [--reference ref.json] [--out results.json]

The greedy check runs the SmolLM2 shape with seeded dummy weights (the packaged GGUF is too large to carry
to the GPU machine), fp32 on both sides, and compares the GPU path's tokens with the CPU reference's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import gc
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("gpu_bench")

GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
GREEDY_TOKENS = 48
WARMUP_REQUESTS = 64  # enough to run the prefill and decode shapes of the measured pass once


def greedy_shape() -> Any:
    """SmolLM2's shape with wider random weights (std 0.1): at the default 0.02 every prompt greedily repeats
    one token, which would make the comparison trivially pass."""
    from weir_bench.gpu import SMOLLM2_135M, Shape

    return Shape(SMOLLM2_135M.name, {**SMOLLM2_135M.config, "initializer_range": 0.1})


def server_args(model_dir: Path, args: argparse.Namespace, dtype: str = "bfloat16") -> list[str]:
    return [
        "--model", str(model_dir), "--load-format", "dummy", "--dtype", dtype, "--embed-model", "none",
        "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--max-waiting", str(max(4 * args.num_requests, 1024)), "--log-level", "warning",
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        *(["--enforce-eager"] if args.enforce_eager else []), *(["--no-run-ahead"] if args.no_run_ahead else []),
    ]  # fmt: skip


# ---- greedy equality -------------------------------------------------------------------------------------


def greedy_prompt_ids(model_dir: Path) -> list[list[int]]:
    """GREEDY_PROMPTS through the SmolLM2 chat template and tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = []
    for prompt in GREEDY_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def greedy_tokens(
    model_dir: Path, prompts: list[list[int]], device: str, dtype: str, enforce_eager: bool = False,
    top2: dict[str, list[list[float]]] | None = None,
) -> dict[str, list[int]]:
    """Greedy tokens for `prompts` through the whole engine: the SmolLM2 shape with seed-0 dummy weights, or real
    weights when `model_dir` is a .gguf file or holds safetensors."""
    import torch

    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.engine.llm_engine import LLMEngine
    from weir_server.engine.types import GenerationRequest, SamplingParams
    from weir_server.models.loader import load_model

    # Weights are loaded (or, dummy, drawn) on the CPU and then moved, so every device and dtype computes with the
    # same ones (the loader would draw dummy weights with the target device's generator).
    load_format = "auto" if model_dir.suffix == ".gguf" or (model_dir / "model.safetensors").exists() else "dummy"
    model = ModelConfig(str(model_dir), load_format=load_format, dtype="float32", device="cpu", max_model_len=1024)
    loaded = load_model(model, "generate")
    loaded.dtype, loaded.device = getattr(torch, dtype), torch.device(device)
    loaded.model.to(device=loaded.device, dtype=loaded.dtype)
    config = EngineConfig(
        model,
        CacheConfig(num_blocks=512, gpu_memory_utilization=0.5),
        SchedulerConfig(max_num_seqs=16),
        ExecutorConfig(enforce_eager=enforce_eager, cuda_graph_max_batch=16),
    )
    engine = LLMEngine(loaded, config)
    # With `top2`: each position's best two candidates [id, logprob, id, logprob], to tell near-ties apart.
    params = SamplingParams(
        max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2 if top2 is not None else None
    )
    for i, ids in enumerate(prompts):
        engine.add_request(engine.validate(GenerationRequest(str(i), ids, params)))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
            if top2 is not None:
                top2.setdefault(out.request_id, []).extend(
                    [e.top[0].token_id, e.top[0].logprob, e.top[1].token_id, e.top[1].logprob]
                    for e in out.logprobs or []
                )
    return tokens


def describe_differences(
    want: dict[str, list[int]], got: dict[str, list[int]], top2: dict[str, list[list[float]]] | None
) -> str:
    """Each first difference, with the reference's margin there (its best minus its second logprob) and whether
    the other path took the reference's runner-up: a small margin and the runner-up is a near-tie broken the
    other way."""
    from weir_bench.gpu import greedy_agreement

    parts = []
    for key, index in greedy_agreement(want, got)["first_difference"].items():
        text = f"prompt {key}: token {index}"
        entry = (top2 or {}).get(key, [])
        if index < len(entry) and index < len(got[key]):
            _, best, second_id, second = entry[index]
            taken = "runner-up" if got[key][index] == second_id else "another token"
            text += f" (reference margin {best - second:.3f} nats, took the {taken})"
        parts.append(text)
    return "; ".join(parts) or "-"


def greedy_check(model_dir: Path, reference: Path) -> list[str]:
    from weir_bench.gpu import greedy_agreement

    saved = json.loads(reference.read_text())
    prompts = saved["prompt_ids"]
    top2 = saved.get("top2")
    references = {"CPU fp32 reference (file)": saved["tokens"]}
    references["CPU fp32 on this machine"] = greedy_tokens(model_dir, prompts, "cpu", "float32")
    cpu_bf16 = greedy_tokens(model_dir, prompts, "cpu", "bfloat16")
    lines = []
    for dtype, eager in (("float32", False), ("float32", True), ("bfloat16", False)):
        got = greedy_tokens(model_dir, prompts, "cuda", dtype, enforce_eager=eager)
        compared = {**references, **({"CPU bf16 on this machine": cpu_bf16} if dtype == "bfloat16" else {})}
        for name, want in compared.items():
            result = greedy_agreement(want, got)
            margins = top2 if name.startswith("CPU fp32") else None
            lines.append(
                f"greedy GPU {dtype} {'eager' if eager else 'CUDA graphs'} vs {name}: {result['identical']}/"
                f"{result['prompts']} prompts identical over {GREEDY_TOKENS} tokens; first differences: "
                + describe_differences(want, got, margins)
            )
            print(lines[-1], flush=True)
        gc.collect()
    return lines


# ---- benchmark ------------------------------------------------------------------------------------------


async def weir_inprocess(model_dir: Path, args: argparse.Namespace, prompts: list[list[int]]) -> list[Any]:
    import torch

    from weir_bench.inprocess import InProcessDriver
    from weir_bench.load import LoadSpec, run_closed_loop
    from weir_bench.report import summarize

    torch.cuda.reset_peak_memory_stats()
    driver = await InProcessDriver.start(server_args(model_dir, args))
    rows = []
    try:
        spec = LoadSpec(args.concurrency, args.num_requests, args.prompt_tokens, args.output_tokens, WARMUP_REQUESTS)
        result = await run_closed_loop(driver, spec, prompts)
        peak = torch.cuda.max_memory_reserved() / 2**20
        rows.append((summarize("weir in-process", result), peak))
        if args.compare_gil_switch:  # the engine shortens the switch interval; show what the default costs
            engine_setting = sys.getswitchinterval()
            sys.setswitchinterval(args.compare_gil_switch)
            result = await run_closed_loop(driver, spec, prompts)
            sys.setswitchinterval(engine_setting)
            label = f"weir in-process, GIL switch {args.compare_gil_switch * 1e3:g} ms"
            rows.append((summarize(label, result), peak))
        spec1 = LoadSpec(1, args.batch1_requests, args.prompt_tokens, args.output_tokens, 1)
        result = await run_closed_loop(driver, spec1, prompts)
        rows.append((summarize("weir in-process batch 1", result), peak))
        await driver.close()
        rows.append(engine_loop(driver._engine.engine, args, prompts, peak))
    finally:
        await driver.close()
        del driver
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def engine_loop(llm: Any, args: argparse.Namespace, prompts: list[list[int]], peak: float) -> tuple[Any, float]:
    """The synchronous engine alone (no asyncio, no streams): the ceiling the async and gRPC paths approach.
    Also prints where a step's time goes."""
    from weir_bench.load import LoadResult, LoadSpec, RequestTiming
    from weir_bench.report import summarize
    from weir_server.engine.types import GenerationRequest, SamplingParams

    spent = {"schedule": 0.0, "execute (launch)": 0.0, "sample (launch)": 0.0, "read back (waits for GPU)": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    llm.scheduler.schedule = timed("schedule", llm.scheduler.schedule)
    llm.runner.execute = timed("execute (launch)", llm.runner.execute)
    llm.sampler.sample = timed("sample (launch)", llm.sampler.sample)
    llm._take = timed("read back (waits for GPU)", llm._take)
    params = SamplingParams(max_tokens=args.output_tokens, min_tokens=args.output_tokens, ignore_eos=True)
    timings: dict[str, RequestTiming] = {}
    steps0 = llm.num_steps
    started = time.perf_counter()
    for i, prompt in enumerate(prompts[: args.num_requests]):
        llm.add_request(llm.validate(GenerationRequest(f"loop-{i}", prompt, params)))
        timings[f"loop-{i}"] = RequestTiming(start=started)
    while llm.has_unfinished():
        for out in llm.step():
            timings[out.request_id].record(len(out.token_ids))
    duration = time.perf_counter() - started
    for t in timings.values():
        t.finish()
    steps = llm.num_steps - steps0
    other = duration - sum(spent.values())
    print(
        f"engine loop: {steps} steps, {duration / steps * 1e3:.2f} ms/step: "
        + ", ".join(f"{k} {v / steps * 1e3:.2f}" for k, v in spent.items())
        + f", rest (outputs, detokenize, bookkeeping) {other / steps * 1e3:.2f}",
        flush=True,
    )
    spec = LoadSpec(args.num_requests, args.num_requests, args.prompt_tokens, args.output_tokens)
    return summarize("weir engine loop (no asyncio)", LoadResult(spec, list(timings.values()), duration)), peak


async def weir_grpc(
    model_dir: Path, args: argparse.Namespace, prompts: list[list[int]], engine_core: str
) -> list[Any]:
    from weir_bench.gpu import gpu_memory_of
    from weir_bench.grpc_driver import GrpcDriver, grpc_ready
    from weir_bench.load import LoadSpec, run_closed_loop
    from weir_bench.multiclient import run_closed_loop_in_processes
    from weir_bench.peers import cpu_seconds, start_weir_server
    from weir_bench.report import summarize

    server = [*server_args(model_dir, args), "--engine-core", engine_core]
    proc, address = await start_weir_server(server, grpc_ready, timeout_s=240)
    driver = GrpcDriver(address, pid=proc.pid)
    rows = []
    try:
        spec = LoadSpec(args.concurrency, args.num_requests, args.prompt_tokens, args.output_tokens, WARMUP_REQUESTS)
        before, client_before = cpu_seconds(proc.pid), time.process_time()
        spies = start_profilers(args.py_spy, proc.pid)
        result = await run_closed_loop(driver, spec, prompts)
        stop_profilers(spies)
        after, client = cpu_seconds(proc.pid), time.process_time() - client_before
        busy = {k: after[k] - before.get(k, 0.0) for k in after}
        print(  # which process was the bottleneck: CPU seconds per second of the run, ~1.0 = one core saturated
            f"gRPC {engine_core}: CPU s/s over {result.duration_s:.2f} s: client {client / result.duration_s:.2f}, "
            + ", ".join(f"{k} {v / result.duration_s:.2f}" for k, v in busy.items() if v > 0.01),
            flush=True,
        )
        label = f"weir gRPC ({args.concurrency} streams, engine {engine_core})"
        rows.append((summarize(label, result), gpu_memory_of(proc.pid)))
        if args.client_processes > 1:  # the same load from several client processes (see weir_bench.multiclient)
            make_driver = functools.partial(GrpcDriver, address)
            result = await run_closed_loop_in_processes(make_driver, spec, prompts, args.client_processes)
            label = f"weir gRPC ({args.concurrency} streams from {args.client_processes} clients, engine {engine_core})"
            rows.append((summarize(label, result), gpu_memory_of(proc.pid)))
        spec1 = LoadSpec(1, args.batch1_requests, args.prompt_tokens, args.output_tokens, 1)
        result = await run_closed_loop(driver, spec1, prompts)
        rows.append((summarize(f"weir gRPC batch 1 (engine {engine_core})", result), gpu_memory_of(proc.pid)))
    finally:
        await driver.close()
        proc.stop()
    return rows


def start_profilers(py_spy: str | None, pid: int) -> list[Any]:
    """py-spy (sampling every thread, native frames off) on the server and each child, into $OUT/spy-*.txt."""
    import subprocess

    from weir_bench.peers import process_tree

    if not py_spy:
        return []
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    return [
        subprocess.Popen(
            [py_spy, "record", "--nonblocking", "-p", str(member), "-r", "250", "-f", "raw",
             "-o", str(out / f"spy-{member}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for member in process_tree(pid)
    ]  # fmt: skip


def stop_profilers(spies: list[Any]) -> None:
    import signal

    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
    for spy in spies:
        spy.wait(timeout=30)


def hf_rows(shape: Any, args: argparse.Namespace, prompts: list[list[int]]) -> list[Any]:
    import torch

    from weir_bench.gpu import hf_continuous, hf_model, hf_static
    from weir_bench.load import LoadSpec
    from weir_bench.report import summarize

    rows = []
    model = hf_model(shape)
    try:
        for batch, count, name in (
            (1, args.hf_batch1_requests, "HF generate batch 1"),
            (256, args.num_requests, "HF generate static batch 256"),
        ):
            torch.cuda.reset_peak_memory_stats()
            spec = LoadSpec(batch, count, args.prompt_tokens, args.output_tokens)
            result = hf_static(model, prompts, batch, spec)
            rows.append((summarize(name, result), torch.cuda.max_memory_reserved() / 2**20))
        if not args.skip_hf_continuous:
            torch.cuda.reset_peak_memory_stats()
            spec = LoadSpec(args.num_requests, args.num_requests, args.prompt_tokens, args.output_tokens)
            try:
                result = hf_continuous(model, prompts, spec)
                rows.append(
                    (summarize("HF generate_batch (continuous)", result), torch.cuda.max_memory_reserved() / 2**20)
                )
            except Exception:  # a transformers API difference must not lose the other rows
                logger.exception("HF generate_batch failed")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def table(rows: list[tuple[str, Any, float | None]]) -> str:
    head = (
        "| shape | target | conc. | ok/err | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | peak GPU MiB |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for shape, row, mem in rows:
        lines.append(
            f"| {shape} | {row.target} | {row.concurrency} | {row.requests}/{row.errors} | "
            f"{row.output_tokens_per_s:,.0f} | {row.ttft_p50_ms:,.1f} / {row.ttft_p99_ms:,.1f} | "
            f"{row.itl_p50_ms:,.2f} / {row.itl_p99_ms:,.2f} | {'' if mem is None else f'{mem:,.0f}'} |"
        )
    return "\n".join(lines)


def ratios(rows: list[tuple[str, Any, float | None]]) -> list[str]:
    by = {(shape, row.target.split(" (")[0]): row.output_tokens_per_s for shape, row, _ in rows}
    lines = []
    for shape in dict.fromkeys(s for s, _, _ in rows):
        inproc = by.get((shape, "weir in-process"))
        static, hf1 = by.get((shape, "HF generate static batch 256")), by.get((shape, "HF generate batch 1"))
        b1 = by.get((shape, "weir gRPC batch 1")) or by.get((shape, "weir in-process batch 1"))
        for _, row, _ in (r for r in rows if r[0] == shape and r[1].target.startswith("weir gRPC (")):
            grpc, parts = row.output_tokens_per_s, []
            if static:
                parts.append(f"gRPC / HF static-256 = {grpc / static:.1f}x")
            if inproc:
                parts.append(f"gRPC / in-process = {grpc / inproc:.0%}")
            lines.append(f"{shape}, {row.target}: " + ", ".join(parts))
        if b1 and hf1:
            lines.append(f"{shape}: batch-1 Weir / HF = {b1 / hf1:.1f}x")
    return lines


async def run(args: argparse.Namespace) -> int:
    import torch

    from weir_bench.gpu import SHAPES, save_json, write_model_dir
    from weir_bench.load import make_prompts

    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp())
    work = Path(tempfile.mkdtemp(prefix="weir-gpu-bench-"))
    notes: list[str] = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    if args.reference:
        try:
            notes += greedy_check(write_model_dir(greedy_shape(), args.tokenizer, work / "greedy"), args.reference)
        except Exception:
            logger.exception("greedy check failed")
            notes.append("greedy check FAILED: " + traceback.format_exc(limit=3).replace("\n", " | "))
    rows: list[tuple[str, Any, float | None]] = []
    for name in args.shapes:
        shape = SHAPES[name]
        model_dir = write_model_dir(shape, args.tokenizer, work / name)
        prompts = make_prompts(
            args.num_requests + WARMUP_REQUESTS, args.prompt_tokens, shape.config["vocab_size"], seed=0
        )
        # The in-process engine is one GPU's; with -tp > 1 only the server has the workers.
        inprocess = not args.skip_inprocess and args.tensor_parallel_size == 1
        targets = [*(["in-process"] if inprocess else []), *(f"gRPC {c}" for c in args.engine_cores), "HF"]
        for label in targets:
            if label == "HF" and args.skip_hf:
                continue
            started = time.perf_counter()
            try:
                if label == "in-process":
                    produced = await weir_inprocess(model_dir, args, prompts)
                elif label.startswith("gRPC"):
                    produced = await weir_grpc(model_dir, args, prompts, label.split()[1])
                else:
                    produced = await asyncio.to_thread(hf_rows, shape, args, prompts)
                for row, mem in produced:
                    rows.append((name, row, mem))
                    print(table([(name, row, mem)]).splitlines()[-1], flush=True)
            except Exception:
                logger.exception("%s %s failed", name, label)
                notes.append(f"{name} {label} FAILED: " + traceback.format_exc(limit=4).replace("\n", " | "))
            logger.warning("%s %s took %.0fs", name, label, time.perf_counter() - started)
    report = "\n".join([
        f"# Weir GPU benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"command: python scripts/gpu_bench.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}",
        f"workload: {args.num_requests} requests x {args.prompt_tokens} random prompt tokens -> "
        f"{args.output_tokens} output tokens (EOS ignored, greedy), bf16, random weights; host {platform.node()}",
        *notes, "", table(rows), "", *ratios(rows),
    ])  # fmt: skip
    print("\n" + report, flush=True)
    (out_dir / "gpu_bench.md").write_text(report + "\n")
    save_json(out_dir / "gpu_bench.json", [{"shape": s, **r.__dict__, "peak_gpu_mib": m} for s, r, m in rows])
    return 0


def reference(args: argparse.Namespace) -> int:
    from weir_bench.gpu import write_model_dir

    work = Path(tempfile.mkdtemp(prefix="weir-greedy-"))
    model_dir = args.model or write_model_dir(greedy_shape(), args.tokenizer, work)
    prompts = greedy_prompt_ids(args.tokenizer)
    top2: dict[str, list[list[float]]] = {}
    tokens = greedy_tokens(model_dir, prompts, "cpu", "float32", top2=top2)
    args.out.write_text(
        json.dumps({"prompts": GREEDY_PROMPTS, "prompt_ids": prompts, "tokens": tokens, "top2": top2})
    )
    print(f"wrote {args.out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="CPU: greedy tokens of the SmolLM2 shape's dummy weights")
    ref.add_argument("--tokenizer", type=Path, required=True, help="a folder with the SmolLM2 tokenizer")
    ref.add_argument("--out", type=Path, required=True)
    ref.add_argument("--model", type=Path, help="real weights (a .gguf file) instead of the dummy SmolLM2 shape")
    greedy = sub.add_parser("greedy", help="GPU: only the greedy check, on real weights (a .gguf file)")
    greedy.add_argument("--model", type=Path, required=True)
    greedy.add_argument("--reference", type=Path, required=True, help="from `reference --model` on the CPU")
    bench = sub.add_parser("run", help="GPU: the benchmark (and the greedy check with --reference)")
    bench.add_argument("--tokenizer", type=Path, required=True, help="a folder with the SmolLM2 tokenizer")
    bench.add_argument("--reference", type=Path, help="greedy tokens from `reference`")
    bench.add_argument("--shapes", nargs="+", default=["SmolLM2-135M", "Llama-3.2-1B"])
    bench.add_argument("--num-requests", type=int, default=512)
    bench.add_argument("--concurrency", type=int, default=512)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--output-tokens", type=int, default=128)
    bench.add_argument("--batch1-requests", type=int, default=4)
    bench.add_argument("--hf-batch1-requests", type=int, default=2)
    bench.add_argument("--max-num-seqs", type=int, default=512)
    bench.add_argument("--max-num-batched-tokens", type=int, default=8192)
    bench.add_argument("--max-model-len", type=int, default=4096)
    bench.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    bench.add_argument("--enforce-eager", action="store_true")
    bench.add_argument("--no-run-ahead", action="store_true", help="the server reads each step's tokens first")
    bench.add_argument("--skip-hf", action="store_true")
    bench.add_argument("--skip-inprocess", action="store_true", help="only the gRPC (and HF) rows")
    bench.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="the gRPC server's -tp (GPUs of this host)"
    )
    bench.add_argument(
        "--engine-cores", nargs="+", default=["process", "thread"], choices=["process", "thread"],
        help="gRPC rows: the server's --engine-core modes to run (default: both)",
    )
    bench.add_argument(
        "--compare-gil-switch", type=float, default=0.005, help="also run in-process at this GIL switch interval"
    )
    bench.add_argument("--skip-hf-continuous", action="store_true")
    bench.add_argument(
        "--client-processes", type=int, default=4,
        help="also run the gRPC load from this many client processes (1: only the one-process row)",
    )
    bench.add_argument("--py-spy", help="path of a py-spy binary: profile the gRPC server's processes under load")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "reference":
        return reference(args)
    if args.command == "greedy":
        lines = greedy_check(args.model, args.reference)
        (Path(os.environ.get("OUT") or tempfile.mkdtemp()) / "greedy.md").write_text("\n".join(lines) + "\n")
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
