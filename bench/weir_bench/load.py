"""Load shapes: closed loop (N workers each send one request at a time) and open loop (requests arrive on a
seeded Poisson or gamma schedule, optionally capped in flight), both until a fixed number have been sent."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass
class RequestTiming:
    """When one streamed request started, when each batch of its tokens arrived, and how it ended."""

    start: float  # time.perf_counter() when the request was sent
    events: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in that message)
    end: float = 0.0
    output_tokens: int | None = None  # the server's count when it gives one; else the sum over events
    cached_tokens: int | None = None  # prompt tokens the server served from its prefix cache, when it says
    error: str | None = None
    requested_tokens: int | None = None  # the output length asked for, set by the load generator

    @classmethod
    def begin(cls) -> RequestTiming:
        """A timing that starts now (call it just before sending the request)."""
        return cls(start=time.perf_counter())

    def record(self, num_tokens: int) -> None:
        """Note that a message carrying `num_tokens` new tokens has just arrived."""
        if num_tokens > 0:
            self.events.append((time.perf_counter(), num_tokens))

    def finish(self, output_tokens: int | None = None, error: str | None = None) -> RequestTiming:
        """Stamp the end of the request; returns self so drivers can `return timing.finish(...)`."""
        self.end = time.perf_counter()
        if output_tokens is not None:
            self.output_tokens = output_tokens
        self.error = error
        return self

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.events)

    @property
    def num_output_tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else sum(n for _, n in self.events)

    @property
    def e2e(self) -> float:
        """Seconds from sending the request to its end."""
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        """Seconds from sending the request to its first generated token."""
        return self.events[0][0] - self.start if self.events else None

    def inter_token_latencies(self) -> list[float]:
        """Gaps between token-carrying messages, split evenly over the tokens of each later message."""
        gaps: list[float] = []
        for (prev, _), (now, n) in itertools.pairwise(self.events):
            gaps.extend([(now - prev) / n] * n)
        return gaps


class Driver(Protocol):
    """One target under load: a gRPC server, an OpenAI-compatible HTTP server, or the engine in-process."""

    name: str

    def peak_rss_pid(self) -> int | None:
        """The process whose VmHWM is this target's peak memory, or None when unknown."""
        ...

    async def vocab_size(self) -> int | None:
        """The served model's vocabulary size, when the target can tell."""
        ...

    async def generate(self, prompt: list[int], output_tokens: int) -> RequestTiming:
        """Stream one completion of exactly `output_tokens` tokens (EOS ignored) and time it; never raises
        for a failed request (the timing carries the error)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class LoadSpec:
    """The shape of one run: closed loop at `concurrency`, or open loop at `request_rate` when it is set."""

    concurrency: int  # closed loop: streams in flight; open loop: the cap on them (0: no cap)
    num_requests: int
    prompt_tokens: int  # per request (the mean, for prompts of a dataset)
    output_tokens: int  # per request (the mean, for a dataset's output lengths)
    warmup_requests: int = 0
    request_rate: float | None = None  # open loop: mean arrivals per second (inf: all at once)
    burstiness: float = 1.0  # gamma shape of the gaps between arrivals; 1 is Poisson
    seed: int = 0  # of the arrival schedule

    @property
    def open_loop(self) -> bool:
        return self.request_rate is not None


@dataclass(frozen=True)
class LoadResult:
    """The timings of one run, how long its measured part took, and when it ran (Unix seconds)."""

    spec: LoadSpec
    timings: list[RequestTiming]
    duration_s: float
    started_at: float = 0.0
    ended_at: float = 0.0


OnDone = Callable[[RequestTiming], None]
OutputLens = int | Sequence[int]


def arrival_gaps(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each of `count` requests: gamma-distributed gaps of mean 1/rate (exponential,
    i.e. Poisson arrivals, at burstiness 1), as vLLM's benchmark_serving draws them; all zero at rate inf."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be positive, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    # The first request goes at once; the schedule's clock starts with it.
    return [0.0] + [rng.gammavariate(burstiness, theta) for _ in range(count - 1)] if count else []


def make_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token-id prompts; equal arguments give equal prompts, so every target sees the same load."""
    rng = random.Random(seed)
    # Skip the lowest ids: most vocabularies keep their special tokens (BOS, EOS, chat markers) there.
    low = min(1000, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(count)]


def _pairs(prompts: Sequence[list[int]], output_tokens: OutputLens) -> Iterator[tuple[list[int], int]]:
    lens = [output_tokens] * len(prompts) if isinstance(output_tokens, int) else output_tokens
    if len(lens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(lens)} output lengths")
    return zip(prompts, lens, strict=True)


async def _run_requests(
    driver: Driver,
    prompts: Sequence[list[int]],
    output_tokens: OutputLens,
    concurrency: int,
    on_done: OnDone | None = None,
) -> list[RequestTiming]:
    """Send every prompt, keeping at most `concurrency` in flight; a worker sends its next as soon as one ends.
    `output_tokens` is one length for all, or one per prompt."""
    pending = _pairs(prompts, output_tokens)
    timings: list[RequestTiming] = []

    async def worker() -> None:
        for prompt, length in pending:  # the shared iterator hands each prompt to exactly one worker
            timing = await driver.generate(prompt, length)
            timing.requested_tokens = length
            timings.append(timing)
            if on_done is not None:
                on_done(timing)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timings


async def _run_arrivals(
    driver: Driver,
    prompts: Sequence[list[int]],
    output_tokens: OutputLens,
    spec: LoadSpec,
    on_done: OnDone | None = None,
) -> list[RequestTiming]:
    """Send each prompt at its arrival time whatever is in flight; with a cap, arrivals beyond it wait for a
    free slot (their clock starts when sent, as in vLLM's benchmark_serving --max-concurrency)."""
    assert spec.request_rate is not None
    gaps = arrival_gaps(len(prompts), spec.request_rate, spec.burstiness, spec.seed)
    slots = asyncio.Semaphore(spec.concurrency) if spec.concurrency > 0 else None

    async def send(prompt: list[int], length: int) -> RequestTiming:
        if slots is None:
            timing = await driver.generate(prompt, length)
        else:
            async with slots:
                timing = await driver.generate(prompt, length)
        timing.requested_tokens = length
        if on_done is not None:
            on_done(timing)
        return timing

    tasks = []
    due = time.perf_counter()
    for gap, (prompt, length) in zip(gaps, _pairs(prompts, output_tokens), strict=True):
        due += gap  # sleep to the schedule's absolute times, so late wake-ups do not add up
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(send(prompt, length)))
    return list(await asyncio.gather(*tasks))


async def run_load(
    driver: Driver,
    spec: LoadSpec,
    prompts: Sequence[list[int]],
    output_lens: Sequence[int] | None = None,
    on_done: OnDone | None = None,
) -> LoadResult:
    """Warm up (closed loop), then send `spec.num_requests` requests in the spec's loop shape and time them.
    `output_lens` gives each prompt its own length (default: `spec.output_tokens` for all); `on_done` is
    called with each measured request as it ends."""
    needed = spec.warmup_requests + spec.num_requests
    if len(prompts) < needed:
        raise ValueError(f"need {needed} prompts, got {len(prompts)}")
    lens: OutputLens = spec.output_tokens if output_lens is None else list(output_lens)
    warm_lens, measured_lens = (
        (lens, lens) if isinstance(lens, int) else (lens[: spec.warmup_requests], lens[spec.warmup_requests : needed])
    )
    if spec.warmup_requests:
        warm_width = spec.concurrency or spec.warmup_requests
        warm = await _run_requests(driver, prompts[: spec.warmup_requests], warm_lens, warm_width)
        _log_failures(driver.name, "warm-up", warm)
    measured = prompts[spec.warmup_requests : needed]
    started_at, started = time.time(), time.perf_counter()
    if spec.open_loop:
        timings = await _run_arrivals(driver, measured, measured_lens, spec, on_done)
        phase = f"request rate {spec.request_rate}"
    else:
        timings = await _run_requests(driver, measured, measured_lens, spec.concurrency, on_done)
        phase = f"concurrency {spec.concurrency}"
    duration = time.perf_counter() - started
    _log_failures(driver.name, phase, timings)
    return LoadResult(spec, timings, duration, started_at, started_at + duration)


async def run_closed_loop(driver: Driver, spec: LoadSpec, prompts: list[list[int]]) -> LoadResult:
    """Warm up, then run `spec.num_requests` requests at `spec.concurrency` and time the measured part."""
    return await run_load(driver, spec, prompts)


def _log_failures(target: str, phase: str, timings: list[RequestTiming]) -> None:
    failed = [t for t in timings if not t.ok]
    if failed:
        logger.warning(
            "%s, %s: %d of %d requests failed; first error: %s",
            target,
            phase,
            len(failed),
            len(timings),
            failed[0].error or "no tokens were returned",
        )
