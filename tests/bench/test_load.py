"""The closed-loop load generator, against a fake driver."""

from __future__ import annotations

import os

import pytest
from bench_fakes import FakeDriver

from weir_bench.load import LoadSpec, make_prompts, run_closed_loop
from weir_bench.peers import peak_rss_bytes

# Async tests run on the session's event loop, where pyproject puts async fixtures too.
session_loop = pytest.mark.asyncio(loop_scope="session")


def test_prompts_are_reproducible_and_in_vocabulary():
    a = make_prompts(3, 16, vocab_size=5000, seed=7)
    assert a == make_prompts(3, 16, vocab_size=5000, seed=7)
    assert a != make_prompts(3, 16, vocab_size=5000, seed=8)
    assert all(len(p) == 16 and all(1000 <= t < 5000 for t in p) for p in a)
    assert all(0 <= t < 8 for p in make_prompts(2, 4, vocab_size=8, seed=0) for t in p)


@session_loop
async def test_closed_loop_keeps_exactly_concurrency_in_flight_and_sends_each_prompt_once():
    driver = FakeDriver()
    prompts = make_prompts(13, 4, vocab_size=100, seed=0)
    result = await run_closed_loop(driver, LoadSpec(4, 10, 4, 3, warmup_requests=3), prompts)
    assert driver.max_in_flight == 4
    assert sorted(map(tuple, driver.seen)) == sorted(map(tuple, prompts))
    assert len(result.timings) == 10  # warm-up requests are not measured
    assert all(t.ok and t.num_output_tokens == 3 for t in result.timings)
    assert result.duration_s > 0


def test_peak_rss_of_this_process_is_positive_and_of_no_process_is_unknown():
    assert (peak_rss_bytes(os.getpid()) or 0) > 0
    assert peak_rss_bytes(None) is None
    assert peak_rss_bytes(2**22 + 12345) is None  # beyond pid_max: no such process
