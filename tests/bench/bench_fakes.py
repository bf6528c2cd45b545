"""A load driver for the harness's tests: no server, answers at once."""

from __future__ import annotations

import asyncio

from weir_bench.load import RequestTiming


class FakeDriver:
    """Answers each request with `output_tokens` one-token messages; records the prompts, the output lengths and
    how many were in flight."""

    name = "fake"

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: list[list[int]] = []  # the prompts
        self.asked: list[int] = []  # the output lengths

    def peak_rss_pid(self) -> int | None:
        return None

    async def vocab_size(self) -> int | None:
        return 100

    async def generate(self, prompt: list[int], output_tokens: int) -> RequestTiming:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.seen.append(prompt)
        self.asked.append(output_tokens)
        timing = RequestTiming.begin()
        for _ in range(output_tokens):
            await asyncio.sleep(0)
            timing.record(1)
        self.in_flight -= 1
        return timing.finish()

    async def close(self) -> None:
        pass
