"""The measured choice of which steps speculate (spec_decode/policy.py), on a simulated clock: it keeps speculating
where that is faster, backs off where it is slower, probes less often while nothing changes, follows a change, and
measures only steps that decode the same batch and nothing else. Then the engine with it on: outputs unchanged."""

from __future__ import annotations

import dataclasses

from engine_helpers import greedy, run
from spec_helpers import NGRAM, assert_same, grounded_prompt, spec_engine

from weir_server.engine.sequence import Sequence
from weir_server.engine.spec_decode.policy import FIRST_PROBE_AFTER, LAST_PROBE_AFTER, SpeculationPolicy, band_of
from weir_server.engine.types import GenerationRequest, SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(n: int) -> list[Sequence]:
    return [Sequence(f"r{i}", 0, [1, 2, 3], SamplingParams(max_tokens=8)) for i in range(n)]


def simulate(policy: SpeculationPolicy, clock: Clock, steps: int, spec_seconds: float, spec_tokens: float,
             running: list[Sequence] | None = None) -> list[bool]:  # fmt: skip
    """`steps` decode steps of `running` (one sequence): a plain one takes 1 ms and gives a token a sequence, a
    speculating one `spec_seconds` and `spec_tokens`. Returns each step's choice."""
    running = running or batch(1)
    choices = []
    for _ in range(steps):
        speculates = policy.speculates(running)
        policy.observe(True, spec_tokens if speculates else 1.0)
        clock.now += spec_seconds if speculates else 1e-3
        choices.append(speculates)
    return choices


def test_it_keeps_speculating_where_speculation_is_faster() -> None:
    clock = Clock()
    choices = simulate(SpeculationPolicy(clock), clock, 400, spec_seconds=1.5e-3, spec_tokens=2.5)
    assert sum(choices[20:]) >= 0.93 * len(choices[20:])


def test_it_backs_off_where_speculation_is_slower_and_probes_ever_less_often() -> None:
    clock = Clock()
    policy = SpeculationPolicy(clock)
    choices = simulate(policy, clock, 2000, spec_seconds=4e-3, spec_tokens=1.2)
    late = choices[20:]
    assert sum(late) <= 0.03 * len(late)
    probes = [i for i in range(1, len(choices)) if choices[i] and not choices[i - 1]]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert probes[0] <= FIRST_PROBE_AFTER + 12 and gaps == sorted(gaps) and gaps[-1] >= LAST_PROBE_AFTER
    assert policy._bands[1].probe_after == LAST_PROBE_AFTER


def test_it_follows_a_change_in_what_pays() -> None:
    clock = Clock()
    policy = SpeculationPolicy(clock)
    assert sum(simulate(policy, clock, 200, spec_seconds=4e-3, spec_tokens=1.0)[20:]) < 10
    later = simulate(policy, clock, 600, spec_seconds=1.2e-3, spec_tokens=3.0)
    assert sum(later[-200:]) >= 195  # a probe found speculation faster again


def test_bands_are_measured_apart() -> None:
    assert [band_of(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 1, 2, 3, 3, 4, 4, 5, 5, 6]
    clock = Clock()
    policy = SpeculationPolicy(clock)
    simulate(policy, clock, 200, spec_seconds=4e-3, spec_tokens=1.0)  # one sequence: slower
    eight = simulate(policy, clock, 200, spec_seconds=1.2e-3, spec_tokens=3.0, running=batch(8))
    assert sum(eight[20:]) >= 0.93 * len(eight[20:])
    assert not policy._bands[1].speculates and policy._bands[4].speculates


def test_only_steps_that_decode_the_same_batch_are_measured() -> None:
    clock = Clock()
    policy = SpeculationPolicy(clock)
    one, other = batch(1), batch(1)
    policy.speculates(one)  # the first step of all is not measured: nothing tells what came before it
    policy.observe(True, 3.0)
    clock.now += 1e-3
    policy.speculates(one)
    policy.observe(True, 3.0)
    clock.now += 1e-3
    policy.speculates(one)  # measures the second step: same batch, decode only
    assert policy._bands[1].spec.samples == 1
    policy.observe(False, 3.0)  # a prompt chunk rode along
    clock.now += 1e-3
    policy.speculates(one)
    assert policy._bands[1].spec.samples == 1
    policy.observe(True, 3.0)
    clock.now += 1.0  # idle until another request came
    policy.speculates(other)
    assert policy._bands[1].spec.samples == 1


def test_outputs_stay_the_same_with_the_policy_choosing(tiny_loaded) -> None:
    requests = {0: [GenerationRequest(f"r{i}", grounded_prompt(i, 20), greedy(40)) for i in range(3)]}
    base = run(spec_engine(tiny_loaded, None), requests)
    engine = spec_engine(tiny_loaded, dataclasses.replace(NGRAM, adaptive=True))
    assert engine.spec is not None and engine.spec.policy is not None
    assert_same(base, run(engine, requests))
    assert engine.spec.stats.num_drafts > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_a_seeded_sampled_request_is_not_left_to_timing(tiny_loaded) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    requests = {0: [GenerationRequest("seeded", grounded_prompt(1, 20), params)]}
    engine = spec_engine(tiny_loaded, dataclasses.replace(NGRAM, adaptive=True))
    first = run(engine, requests)
    assert engine.spec is not None and engine.spec.policy is not None and not engine.spec.policy._bands
    assert_same(first, run(spec_engine(tiny_loaded, dataclasses.replace(NGRAM, adaptive=True)), requests))
