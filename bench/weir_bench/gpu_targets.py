"""The targets `weir bench gpu run` measures, each returning (row, peak GPU MiB) pairs: Weir in-process (and its
engine loop alone), `weir serve` over gRPC, and Hugging Face transformers."""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from weir_bench.engines import core_of
from weir_bench.gpu import Shape, gpu_memory_of, hf_continuous, hf_model, hf_static
from weir_bench.load import LoadResult, LoadSpec, RequestTiming, run_closed_loop
from weir_bench.peers import process_tree
from weir_bench.report import Row, summarize

logger = logging.getLogger(__name__)
WARMUP_REQUESTS = 64  # enough to run the prefill and decode shapes of the measured pass once
Measured = tuple[Row, float | None]


def server_args(model_dir: Path, args: argparse.Namespace, dtype: str = "bfloat16") -> list[str]:
    """The `weir serve` options of every Weir row (the in-process rows build the same engine from them)."""
    return [
        "--model", str(model_dir), "--load-format", "dummy", "--dtype", dtype, "--embed-model", "none",
        "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--max-waiting", str(max(4 * args.num_requests, 1024)), "--log-level", "warning",
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        *(["--enforce-eager"] if args.enforce_eager else []), *(["--no-run-ahead"] if args.no_run_ahead else []),
    ]  # fmt: skip


def _spec(args: argparse.Namespace, concurrency: int, requests: int, warmup: int = 0) -> LoadSpec:
    return LoadSpec(concurrency, requests, args.prompt_tokens, args.output_tokens, warmup)


async def weir_inprocess(model_dir: Path, args: argparse.Namespace, prompts: list[list[int]]) -> list[Measured]:
    """AsyncEngine in this process at --concurrency and at batch 1, then its engine core stepped synchronously."""
    import torch

    from weir_bench.inprocess import InProcessDriver

    torch.cuda.reset_peak_memory_stats()
    driver = await InProcessDriver.start(server_args(model_dir, args))
    rows: list[Measured] = []
    try:
        spec = _spec(args, args.concurrency, args.num_requests, WARMUP_REQUESTS)
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
        result = await run_closed_loop(driver, _spec(args, 1, args.batch1_requests, 1), prompts)
        rows.append((summarize("weir in-process batch 1", result), peak))
        await driver.close()
        rows.append((engine_loop(core_of(driver.engine), args, prompts), peak))
    finally:
        await driver.close()
        del driver
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def engine_loop(core: Any, args: argparse.Namespace, prompts: list[list[int]]) -> Row:
    """The synchronous engine core alone (no asyncio, no streams): the ceiling the async and gRPC paths approach.
    Also prints where a step's time goes."""
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

    core.scheduler.schedule = timed("schedule", core.scheduler.schedule)
    core.runner.execute = timed("execute (launch)", core.runner.execute)
    core.sampler.sample = timed("sample (launch)", core.sampler.sample)
    core._take = timed("read back (waits for GPU)", core._take)
    params = SamplingParams(max_tokens=args.output_tokens, min_tokens=args.output_tokens, ignore_eos=True)
    timings: dict[str, RequestTiming] = {}
    steps0 = core.num_steps
    started = time.perf_counter()
    for i, prompt in enumerate(prompts[: args.num_requests]):
        core.add_request(core.validate(GenerationRequest(f"loop-{i}", prompt, params)))
        timings[f"loop-{i}"] = RequestTiming(start=started)
    while core.has_unfinished():
        for out in core.step():
            timings[out.request_id].record(len(out.token_ids))
    duration = time.perf_counter() - started
    for t in timings.values():
        t.finish()
    steps = core.num_steps - steps0
    other = duration - sum(spent.values())
    print(
        f"engine loop: {steps} steps, {duration / steps * 1e3:.2f} ms/step: "
        + ", ".join(f"{k} {v / steps * 1e3:.2f}" for k, v in spent.items())
        + f", rest (outputs, detokenize, bookkeeping) {other / steps * 1e3:.2f}",
        flush=True,
    )
    spec = _spec(args, args.num_requests, args.num_requests)
    return summarize("weir engine loop (no asyncio)", LoadResult(spec, list(timings.values()), duration))


async def weir_grpc(
    model_dir: Path, args: argparse.Namespace, prompts: list[list[int]], engine_core: str
) -> list[Measured]:
    """`weir serve --engine-core <engine_core>` on loopback: --concurrency streams from this process (and from
    --client-processes processes), then batch 1; prints each process's CPU use during the first run."""
    from weir_bench.grpc_driver import GrpcDriver, grpc_ready
    from weir_bench.multiclient import run_closed_loop_in_processes
    from weir_bench.peers import cpu_seconds, start_weir_server

    server = [*server_args(model_dir, args), "--engine-core", engine_core]
    proc, address = await start_weir_server(server, grpc_ready, timeout_s=240)
    driver = GrpcDriver(address, pid=proc.pid)
    rows: list[Measured] = []
    try:
        spec = _spec(args, args.concurrency, args.num_requests, WARMUP_REQUESTS)
        before, client_before = cpu_seconds(proc.pid), time.process_time()
        spies = start_profilers(args.py_spy, proc.pid, args.out_dir)
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
        result = await run_closed_loop(driver, _spec(args, 1, args.batch1_requests, 1), prompts)
        rows.append((summarize(f"weir gRPC batch 1 (engine {engine_core})", result), gpu_memory_of(proc.pid)))
    finally:
        await driver.close()
        proc.stop()
    return rows


def start_profilers(py_spy: str | None, pid: int, out_dir: Path | None) -> list[subprocess.Popen[bytes]]:
    """py-spy (sampling every thread, native frames off) on the server and each child, into OUT_DIR/spy-PID.txt."""
    if not py_spy or out_dir is None:  # the command line asks for --out-dir with --py-spy
        return []
    return [
        subprocess.Popen(
            [py_spy, "record", "--nonblocking", "-p", str(member), "-r", "250", "-f", "raw",
             "-o", str(out_dir / f"spy-{member}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for member in process_tree(pid)
    ]  # fmt: skip


def stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
    for spy in spies:
        spy.wait(timeout=30)


def hf_rows(shape: Shape, args: argparse.Namespace, prompts: list[list[int]]) -> list[Measured]:
    """transformers' `generate` at batch 1 and static batch 256, then `generate_batch` (continuous batching)."""
    import torch

    rows: list[Measured] = []
    model = hf_model(shape)
    try:
        for batch, count, name in (
            (1, args.hf_batch1_requests, "HF generate batch 1"),
            (256, args.num_requests, "HF generate static batch 256"),
        ):
            torch.cuda.reset_peak_memory_stats()
            result = hf_static(model, prompts, batch, _spec(args, batch, count))
            rows.append((summarize(name, result), torch.cuda.max_memory_reserved() / 2**20))
        if not args.skip_hf_continuous:
            torch.cuda.reset_peak_memory_stats()
            try:
                result = hf_continuous(model, prompts, _spec(args, args.num_requests, args.num_requests))
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
