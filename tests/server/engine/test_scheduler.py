"""Scheduler without a model: token budgets, chunked prefill, admission, preemption, abort, n>1 siblings."""

from __future__ import annotations

import pytest

from weir_server.config import SchedulerConfig
from weir_server.engine.block_manager import BlockManager
from weir_server.engine.scheduler import Scheduler, SchedulerOutput
from weir_server.engine.sequence import Sequence, SequenceStatus
from weir_server.engine.types import FinishReason, SamplingParams


def _seq(tokens: list[int], request_id: str = "r", **params) -> Sequence:
    return Sequence(request_id, 0, tokens, SamplingParams(**params))


def _scheduler(num_blocks=64, block_size=4, budget=16, max_seqs=8, chunked=True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def _finish_step(scheduler: Scheduler, out: SchedulerOutput, token: int = 3) -> None:
    scheduler.update(out)
    for s in out.scheduled:
        if s.do_sample:
            s.seq.append_token(token, None)


def test_token_budget_chunks_a_long_prompt_across_steps():
    scheduler = _scheduler(budget=16)
    seq = _seq(list(range(40)))
    scheduler.add([seq])
    chunks = []
    while not seq.num_output_tokens:
        out = scheduler.schedule()
        chunks.append([(s.start, s.num_new_tokens, s.do_sample) for s in out.scheduled])
        _finish_step(scheduler, out)
    assert chunks == [[(0, 16, False)], [(16, 16, False)], [(32, 8, True)]]


def test_decodes_are_scheduled_before_new_prefills():
    scheduler = _scheduler(budget=8)
    running = _seq([1, 2, 3], "a")
    scheduler.add([running])
    _finish_step(scheduler, scheduler.schedule())
    scheduler.add([_seq(list(range(20)), "b")])
    out = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_max_num_seqs_limits_admission():
    scheduler = _scheduler(max_seqs=2)
    scheduler.add([_seq([1], f"r{i}") for i in range(4)])
    assert len(scheduler.schedule().scheduled) == 2 and len(scheduler.waiting) == 2


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    scheduler = _scheduler(num_blocks=4, block_size=2, budget=64)
    a, b = _seq([1, 2, 3, 4], "a"), _seq([5, 6, 7, 8], "b")
    scheduler.add([a, b])
    out = scheduler.schedule()
    assert len(out.scheduled) == 2 and scheduler.block_manager.num_free_blocks == 0
    _finish_step(scheduler, out)  # the sampled 5th tokens need a third block each
    out = scheduler.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert b.status is SequenceStatus.WAITING and scheduler.waiting[0] is b and b.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1


def test_abort_removes_running_and_waiting_sequences_and_frees_blocks():
    scheduler = _scheduler(max_seqs=1)
    a, b = _seq([1, 2, 3], "a"), _seq([4, 5], "b")
    scheduler.add([a, b])
    scheduler.schedule()
    aborted = scheduler.abort("a") + scheduler.abort("b")
    assert aborted == [a, b] and all(s.finish_reason is FinishReason.CANCELLED for s in aborted)
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks
    assert scheduler.num_waiting_requests == 0


def test_without_chunked_prefill_an_oversized_prompt_runs_alone():
    scheduler = _scheduler(budget=8, chunked=False)
    scheduler.add([_seq(list(range(20)), "big"), _seq([1, 2], "small")])
    out = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("big", 20)]


@pytest.mark.parametrize("n", [2, 3])
def test_siblings_wait_for_the_leader_prompt_then_share_its_blocks(n):
    scheduler = _scheduler(budget=64)
    leader = Sequence("r", 0, list(range(10)), SamplingParams(n=n))
    siblings = [Sequence("r", i, list(range(10)), SamplingParams(n=n), leader=leader) for i in range(1, n)]
    scheduler.add([leader, *siblings])
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == [leader]
    _finish_step(scheduler, out)
    out = scheduler.schedule()
    assert {s.seq.index: s.num_new_tokens for s in out.scheduled} == {0: 1, **{i: 2 for i in range(1, n)}}
    assert all(s.num_cached_tokens == 8 for s in siblings)
