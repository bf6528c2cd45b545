"""Verify steps laid out for CUDA graphs of 1 + K rows a sequence (front-padded where a sequence has fewer new
tokens), checked on the CPU by running the captured computation eagerly from the static buffers: the same hidden
states as the eager step, and the same greedy outputs as decoding without speculation, for the target's verify steps
and the draft model's steps alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import greedy, run
from spec_helpers import NGRAM, assert_same, graphed_on_cpu, grounded_prompt, random_workload, spec_engine
from tiny_models import save_tiny_llama

from weir_server.config import ModelConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.types import GenerationRequest
from weir_server.executor.batch import ScheduledSeq, StepSeq, TokenWindow
from weir_server.executor.cuda_graphs import DecodeGraphs, DecodeInput, graph_query_len
from weir_server.models.loader import load_model

K = NGRAM.num_speculative_tokens


def step_of(seq_id: int, start: int, tokens: list[int], table: list[int]) -> ScheduledSeq[StepSeq]:
    return ScheduledSeq(StepSeq(seq_id, TokenWindow(start, tokens), table, 1), len(tokens), start)


def test_a_verify_batch_replays_the_smallest_query_length_holding_it() -> None:
    table = [0, 1, 2]
    decode = [step_of(0, 7, [5], table), step_of(1, 3, [6], table)]
    verify = [step_of(0, 7, [5, 6, 7], table), step_of(1, 4, [6], table)]
    assert graph_query_len(decode, [1, 5]) == 1
    assert graph_query_len(verify, [1, 5]) == 5
    assert graph_query_len(verify, [1]) is None  # no verify graphs without speculation
    assert graph_query_len([step_of(0, 7, list(range(6)), table)], [1, 5]) is None  # longer than 1 + K
    assert graph_query_len([step_of(0, 1, [5, 6], table)], [1, 5]) is None  # front padding would reach position -3


def test_verify_graphs_stop_at_the_back_off_size_and_decode_graphs_do_not() -> None:
    graphs = DecodeGraphs(
        lambda *a: torch.zeros(0), torch.device("cpu"), 16, 4, 64, query_lens=(1, 5), multi_max_batch=4
    )
    table = list(range(16))
    verify = [step_of(i, 8, [5, 6], table) for i in range(5)]
    decode = [step_of(i, 8, [5], table) for i in range(10)]
    assert graphs.prepare(verify) is None  # 5 sequences speculate only without back-off: eager
    assert graphs.prepare(verify[:3]) == DecodeInput(3, 4, 5)
    assert graphs.prepare(decode) == DecodeInput(10, 16, 1)


def test_front_padded_verify_rows_reproduce_the_eager_step(tiny_loaded) -> None:
    engine = spec_engine(tiny_loaded, None)
    for i in range(3):
        engine.add_request(engine.validate(GenerationRequest(f"r{i}", grounded_prompt(i, 12 + 5 * i), greedy(8))))
    engine.step()  # prefill everything
    # A verify-shaped batch: each sequence's last token plus 0, 2 and 4 made-up proposals, scheduled as the
    # SpecDecoder's are (riding in token_ids, the scheduler allocating their blocks).
    for seq, k in zip(engine.scheduler.running, (0, 2, 4), strict=True):
        seq.token_ids.extend([7] * k)
    batch = engine.scheduler.schedule().scheduled
    assert sorted(s.num_new_tokens for s in batch) == [1, 3, 5]
    runner = engine.runner
    graphs = DecodeGraphs(
        runner._graph_forward, runner.device, 4, runner.block_size, runner.max_model_len, query_lens=(1, 1 + K)
    )
    decode = graphs.prepare(batch)
    assert decode is not None and (decode.padded, decode.query_len) == (4, 1 + K)
    with torch.inference_mode():
        padded = graphs.replay_eager(decode)
        eager = runner.forward(runner.prepare(batch))
    firsts = zip(decode.first_rows(batch), batch, strict=True)
    rows = [r for first, s in firsts for r in range(first, first + s.num_new_tokens)]
    torch.testing.assert_close(padded[rows], eager, rtol=1e-5, atol=1e-5)
    front = [r for i, s in enumerate(batch) for r in range(i * (1 + K), (i + 1) * (1 + K) - s.num_new_tokens)]
    assert graphs.i64[2, front].eq(-1).all(), "front padding must not rewrite cached K/V"


@pytest.mark.parametrize("seed", [0, 1])
def test_ngram_verify_steps_through_the_graph_layout_give_the_eager_greedy_outputs(tiny_loaded, seed) -> None:
    base = run(spec_engine(tiny_loaded, None), random_workload(seed))
    engine = spec_engine(tiny_loaded, NGRAM)
    replayed = graphed_on_cpu(engine.runner, (1, 1 + K))
    assert_same(base, run(engine, random_workload(seed)))
    assert 1 + K in replayed and 1 in replayed
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("draft"), 384)


def test_draft_model_steps_through_the_graph_layout_give_the_eager_greedy_outputs(draft_dir) -> None:
    """The target as its own draft: proposals are accepted in full, so the draft's catch-up steps run two tokens."""
    target = load_model(ModelConfig(str(draft_dir), device="cpu", dtype="float32"))
    spec = SpeculativeConfig(
        "draft_model", num_speculative_tokens=3, model=str(draft_dir), disable_by_batch_size=None, adaptive=False
    )
    base = run(spec_engine(target, None), random_workload(3))
    engine: EngineCore = spec_engine(target, spec)
    verify = graphed_on_cpu(engine.runner, (1, 4))
    draft = graphed_on_cpu(engine.spec.proposer.runner, (1, 2))  # type: ignore[union-attr]
    assert_same(base, run(engine, random_workload(3)))
    assert 4 in verify and {1, 2} <= set(draft)
