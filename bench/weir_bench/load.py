"""Closed-loop load: N workers each send one request at a time until a fixed number have been sent."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
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
    """The shape of one closed-loop run."""

    concurrency: int
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    warmup_requests: int = 0


@dataclass(frozen=True)
class LoadResult:
    """The timings of one closed-loop run and how long its measured part took."""

    spec: LoadSpec
    timings: list[RequestTiming]
    duration_s: float


def make_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token-id prompts; equal arguments give equal prompts, so every target sees the same load."""
    rng = random.Random(seed)
    # Skip the lowest ids: most vocabularies keep their special tokens (BOS, EOS, chat markers) there.
    low = min(1000, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(count)]


async def _run_requests(
    driver: Driver, prompts: list[list[int]], output_tokens: int, concurrency: int
) -> list[RequestTiming]:
    """Send every prompt, keeping at most `concurrency` in flight; a worker sends its next as soon as one ends."""
    pending = iter(prompts)
    timings: list[RequestTiming] = []

    async def worker() -> None:
        for prompt in pending:  # the shared iterator hands each prompt to exactly one worker
            timings.append(await driver.generate(prompt, output_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timings


async def run_closed_loop(driver: Driver, spec: LoadSpec, prompts: list[list[int]]) -> LoadResult:
    """Warm up, then run `spec.num_requests` requests at `spec.concurrency` and time the measured part."""
    needed = spec.warmup_requests + spec.num_requests
    if len(prompts) < needed:
        raise ValueError(f"need {needed} prompts, got {len(prompts)}")
    if spec.warmup_requests:
        warm = await _run_requests(driver, prompts[: spec.warmup_requests], spec.output_tokens, spec.concurrency)
        _log_failures(driver.name, "warm-up", warm)
    started = time.perf_counter()
    timings = await _run_requests(driver, prompts[spec.warmup_requests : needed], spec.output_tokens, spec.concurrency)
    duration = time.perf_counter() - started
    _log_failures(driver.name, f"concurrency {spec.concurrency}", timings)
    return LoadResult(spec, timings, duration)


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
