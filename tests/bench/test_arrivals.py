"""Open-loop load: the seeded arrival schedule and the cap on requests in flight (a fake driver, no timing)."""

from __future__ import annotations

import statistics

import pytest
from bench_fakes import FakeDriver

from weir_bench.load import LoadSpec, arrival_gaps, make_prompts, run_load

session_loop = pytest.mark.asyncio(loop_scope="session")


def test_poisson_gaps_have_mean_one_over_the_rate():
    gaps = arrival_gaps(20_001, rate=8.0, seed=3)
    assert gaps[0] == 0.0  # the first request goes at once
    mean = statistics.fmean(gaps[1:])
    assert mean == pytest.approx(1 / 8.0, rel=0.03)  # 20,000 draws: the sample mean is within ~0.7% (1 sigma)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.stdev(gaps[1:]) == pytest.approx(mean, rel=0.05)


def test_the_schedule_is_reproducible_from_its_seed():
    assert arrival_gaps(50, rate=2.0, seed=1) == arrival_gaps(50, rate=2.0, seed=1)
    assert arrival_gaps(50, rate=2.0, seed=1) != arrival_gaps(50, rate=2.0, seed=2)


def test_lower_burstiness_keeps_the_mean_rate_but_spreads_the_gaps():
    poisson = arrival_gaps(20_001, rate=4.0, burstiness=1.0, seed=0)[1:]
    bursty = arrival_gaps(20_001, rate=4.0, burstiness=0.25, seed=0)[1:]
    assert statistics.fmean(bursty) == pytest.approx(0.25, rel=0.06)
    assert statistics.stdev(bursty) > 1.5 * statistics.stdev(poisson)  # gamma CV is 1/sqrt(shape) = 2


def test_infinite_rate_sends_everything_at_once():
    assert arrival_gaps(5, rate=float("inf")) == [0.0] * 5


@pytest.mark.parametrize("rate,burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_non_positive_rate_or_burstiness_is_refused(rate, burstiness):
    with pytest.raises(ValueError, match="positive"):
        arrival_gaps(3, rate, burstiness)


@session_loop
async def test_open_loop_at_inf_without_a_cap_has_every_request_in_flight_at_once():
    driver = FakeDriver()
    prompts = make_prompts(12, 4, vocab_size=100, seed=0)
    result = await run_load(driver, LoadSpec(0, 12, 4, 3, request_rate=float("inf")), prompts)
    assert driver.max_in_flight == 12
    assert len(result.timings) == 12 and all(t.ok for t in result.timings)


@session_loop
async def test_max_concurrency_caps_open_loop_requests_in_flight():
    driver = FakeDriver()
    prompts = make_prompts(14, 4, vocab_size=100, seed=0)
    spec = LoadSpec(3, 12, 4, 3, warmup_requests=2, request_rate=float("inf"))
    result = await run_load(driver, spec, prompts)
    assert driver.max_in_flight == 3
    assert len(result.timings) == 12  # the warm-up is not measured
    assert result.ended_at >= result.started_at > 0


@session_loop
async def test_each_request_asks_for_its_own_output_length():
    driver = FakeDriver()
    prompts = make_prompts(4, 4, vocab_size=100, seed=0)
    result = await run_load(driver, LoadSpec(2, 4, 4, 5), prompts, output_lens=[2, 5, 7, 9])
    assert sorted(driver.asked) == [2, 5, 7, 9]
    assert sorted(t.requested_tokens or 0 for t in result.timings) == [2, 5, 7, 9]
