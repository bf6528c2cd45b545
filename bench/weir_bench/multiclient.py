"""The closed loop spread over several client processes.

One Python process reads at most on the order of 100k stream messages a second (grpc.aio's per-message work on
one event loop); a server streaming 512 sequences at a few milliseconds per token outruns it, and then the
harness measures itself. Each process here runs its share of the streams over its own channel; the measured
parts start together (a barrier after every process's warm-up) and the result spans the first start to the
last end. Timestamps are `time.perf_counter()`, which on Linux is the system-wide monotonic clock, so the
processes' timings compare directly.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

from weir_bench.load import Driver, LoadResult, LoadSpec, RequestTiming, _log_failures, _run_requests


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _client_main(
    make_driver: Callable[[], Driver],
    spec: LoadSpec,
    warmup: list[list[int]],
    measured: list[list[int]],
    barrier: Any,
    results: Any,
) -> None:
    async def main() -> tuple[list[RequestTiming], float, float]:
        driver = make_driver()
        try:
            if warmup:
                await _run_requests(driver, warmup, spec.output_tokens, spec.concurrency)
            await asyncio.to_thread(barrier.wait)
            started = time.perf_counter()
            timings = await _run_requests(driver, measured, spec.output_tokens, spec.concurrency)
            return timings, started, time.perf_counter()
        finally:
            await driver.close()

    results.put(asyncio.run(main()))


async def run_closed_loop_in_processes(
    make_driver: Callable[[], Driver], spec: LoadSpec, prompts: list[list[int]], processes: int, name: str = "client"
) -> LoadResult:
    """`run_closed_loop` with the streams (and prompts) dealt round-robin over `processes` client processes;
    `make_driver` must pickle (e.g. functools.partial of a driver class)."""
    needed = spec.warmup_requests + spec.num_requests
    if len(prompts) < needed:
        raise ValueError(f"need {needed} prompts, got {len(prompts)}")
    processes = max(1, min(processes, spec.concurrency))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    warm, measured = prompts[: spec.warmup_requests], prompts[spec.warmup_requests : needed]
    children = []
    for i in range(processes):
        part = LoadSpec(
            _share(spec.concurrency, processes, i), _share(spec.num_requests, processes, i), spec.prompt_tokens,
            spec.output_tokens, _share(spec.warmup_requests, processes, i),
        )  # fmt: skip
        child = ctx.Process(
            target=_client_main,
            args=(make_driver, part, warm[i::processes], measured[i::processes], barrier, results),
            name=f"weir-bench-client-{i}",
        )
        child.start()
        children.append(child)
    try:
        parts = [await asyncio.to_thread(results.get) for _ in children]
    finally:
        for child in children:
            await asyncio.to_thread(child.join, 30)
    timings = [t for part in parts for t in part[0]]
    duration = max(p[2] for p in parts) - min(p[1] for p in parts)
    _log_failures(name, f"concurrency {spec.concurrency} from {processes} processes", timings)
    return LoadResult(spec, timings, duration)
