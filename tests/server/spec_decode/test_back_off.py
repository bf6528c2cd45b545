"""Speculation backs off above `disable_by_batch_size` running sequences (vLLM's key): such steps propose nothing,
and on CUDA the engine then runs ahead (launches a step before the previous step's tokens are read back), which the
CPU tests switch on by hand as tests/server/engine/test_overlap.py does. Outputs stay those without speculation."""

from __future__ import annotations

import dataclasses

import pytest
from engine_helpers import greedy, run
from spec_helpers import NGRAM, assert_same, graphed_on_cpu, grounded_prompt, spec_engine

from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest

BACK_OFF = dataclasses.replace(NGRAM, disable_by_batch_size=3)


def shrinking_batch() -> dict[int, list[GenerationRequest]]:
    """Six requests at once, of lengths 4..54: the batch shrinks through the threshold as they end, then one more
    request joins the last one and a penalty (read on the host) stops running ahead for a while."""
    requests = [GenerationRequest(f"r{i}", grounded_prompt(i, 16 + i), greedy(4 + 10 * i)) for i in range(6)]
    late = GenerationRequest("late", grounded_prompt(9, 20), greedy(12, repetition_penalty=1.2))
    return {0: requests, 30: [late]}


def watched(engine: EngineCore) -> list[tuple[int, bool, bool]]:
    """(running sequences, proposals made, launched ahead) of each step of `engine`."""
    steps: list[tuple[int, bool, bool]] = []
    spec, step = engine.spec, engine.step
    assert spec is not None

    def watched_step():
        running = len(engine.scheduler.running)
        outputs = step()
        steps.append((running, spec.stats.num_drafts > drafts[0], engine._launched is not None))
        drafts[0] = spec.stats.num_drafts
        return outputs

    drafts = [0]
    engine.step = watched_step  # type: ignore[method-assign]
    return steps


def test_steps_above_the_batch_size_propose_nothing_and_outputs_stay_the_same(tiny_loaded) -> None:
    base = run(spec_engine(tiny_loaded, None), shrinking_batch())
    engine = spec_engine(tiny_loaded, BACK_OFF)
    steps = watched(engine)
    assert_same(base, run(engine, shrinking_batch()))
    assert not any(proposed for running, proposed, _ in steps if running > 3)
    assert any(proposed for running, proposed, _ in steps if running <= 3)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-layout"])
def test_the_engine_runs_ahead_while_backed_off_and_stops_to_speculate(tiny_loaded, graphs) -> None:
    base = run(spec_engine(tiny_loaded, None), shrinking_batch())
    engine = spec_engine(tiny_loaded, BACK_OFF)
    engine.overlap_outputs = engine.run_ahead = True  # as on CUDA
    if graphs:
        graphed_on_cpu(engine.runner, (1, 1 + BACK_OFF.num_speculative_tokens))
    steps = watched(engine)
    assert_same(base, run(engine, shrinking_batch()))
    assert any(ahead for running, _, ahead in steps if running > 3)
    assert not any(ahead for running, _, ahead in steps if 0 < running <= 3), "a speculating step ran ahead"
    assert any(proposed for running, proposed, _ in steps if running <= 3)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_without_back_off_the_engine_never_runs_ahead(tiny_loaded) -> None:
    engine = spec_engine(tiny_loaded, NGRAM)
    engine.overlap_outputs = engine.run_ahead = True
    steps = watched(engine)
    run(engine, shrinking_batch())
    assert not any(ahead for _, _, ahead in steps)
