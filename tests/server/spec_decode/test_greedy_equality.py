"""Greedy decoding with n-gram speculation is decoding without it, token for token, through everything the engine
does: continuous batching, chunked prefill, preemption, prefix caching, stops inside accepted runs, aborts."""

from __future__ import annotations

import pytest
from engine_helpers import greedy, run
from spec_helpers import NGRAM, assert_same, grounded_prompt, random_workload, spec_engine, summary

from weir_server.engine.block_manager import hash_block
from weir_server.engine.types import GenerationRequest, SamplingParams


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_output_is_identical_with_and_without_ngram_speculation(tiny_loaded, seed):
    base = run(spec_engine(tiny_loaded, None), random_workload(seed))
    engine = spec_engine(tiny_loaded, NGRAM)
    spec = run(engine, random_workload(seed))
    assert_same(base, spec)
    stats = engine.stats()
    assert stats.spec_num_accepted_tokens > 0 and stats.spec_num_draft_tokens >= stats.spec_num_accepted_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_speculation_takes_fewer_steps_on_an_input_grounded_prompt(tiny_loaded):
    request = GenerationRequest("g", grounded_prompt(7, 40), greedy(60))
    base_engine, spec = spec_engine(tiny_loaded, None), spec_engine(tiny_loaded, NGRAM)
    assert summary(run(spec, {0: [request]})[("g", 0)]) == summary(run(base_engine, {0: [request]})[("g", 0)])
    assert spec.stats().num_steps < base_engine.stats().num_steps


def test_preemption_under_a_tiny_kv_cache_keeps_outputs_identical(tiny_loaded):
    base = run(spec_engine(tiny_loaded, None, num_blocks=40), random_workload(2))
    engine = spec_engine(tiny_loaded, NGRAM, num_blocks=40)
    assert_same(base, run(engine, random_workload(2)))
    assert engine.stats().num_preemptions > 0


def test_a_small_token_budget_cuts_proposals_and_chunks_prefill_without_changing_outputs(tiny_loaded):
    base = run(spec_engine(tiny_loaded, None, max_num_batched_tokens=8), random_workload(3))
    assert_same(base, run(spec_engine(tiny_loaded, NGRAM, max_num_batched_tokens=8), random_workload(3)))


def test_prefix_cache_holds_only_blocks_of_tokens_the_sequences_kept(tiny_loaded):
    engine = spec_engine(tiny_loaded, NGRAM, block_size=4)
    workload = random_workload(4)
    outputs = run(engine, workload)
    known: set[int] = set()
    requests = {r.request_id: r for batch in workload.values() for r in batch}
    for (request_id, _), outs in outputs.items():
        tokens = list(requests[request_id].prompt_token_ids) + summary(outs)[0]
        parent = None
        for i in range(len(tokens) // 4):
            parent = hash_block(parent, tuple(tokens[i * 4 : (i + 1) * 4]))
            known.add(parent)
    cached = engine.block_manager.hash_to_block
    assert cached and set(cached) <= known
    # A follow-up turn over prompt + output hits those blocks and decodes as without speculation.
    first = requests["r0"]
    follow = list(first.prompt_token_ids) + summary(outputs[("r0", 0)])[0] + [5, 6]
    again = GenerationRequest("f", follow, greedy(20))
    base = run(spec_engine(tiny_loaded, None), {0: [again]})
    spec = run(engine, {0: [again]})
    assert summary(spec[("f", 0)]) == summary(base[("f", 0)])
    assert spec[("f", 0)][-1].usage.cached_tokens > 0


def accepted_run_position(outputs) -> int:
    """An output position inside a multi-token output (an accepted run), not its last token."""
    position = 0
    for out in outputs:
        if len(out.token_ids) > 2:
            return position + 1
        position += len(out.token_ids)
    raise AssertionError("no accepted run of 3 or more tokens in this output")


def test_a_stop_token_inside_an_accepted_run_ends_the_choice_there(tiny_loaded):
    request = GenerationRequest("s", grounded_prompt(7, 40), greedy(60))
    free = run(spec_engine(tiny_loaded, NGRAM), {0: [request]})[("s", 0)]
    tokens = summary(free)[0]
    stop = next(t for i, t in enumerate(tokens) if i >= accepted_run_position(free) and t not in tokens[:i])
    params = greedy(60, stop_token_ids=(stop,))
    stopped = GenerationRequest("s", request.prompt_token_ids, params)
    base = run(spec_engine(tiny_loaded, None), {0: [stopped]})[("s", 0)]
    spec = run(spec_engine(tiny_loaded, NGRAM), {0: [stopped]})[("s", 0)]
    assert summary(spec) == summary(base)
    assert summary(spec)[0] == tokens[: tokens.index(stop) + 1]
    assert summary(spec)[2].value == "stop"


def test_max_tokens_reached_mid_run_emits_exactly_max_tokens(tiny_loaded):
    request = GenerationRequest("m", grounded_prompt(7, 40), greedy(60))
    free = run(spec_engine(tiny_loaded, NGRAM), {0: [request]})[("m", 0)]
    limit = accepted_run_position(free) + 1
    capped = GenerationRequest("m", request.prompt_token_ids, greedy(limit))
    engine = spec_engine(tiny_loaded, NGRAM)
    out = run(engine, {0: [capped]})[("m", 0)]
    assert summary(out)[0] == summary(free)[0][:limit]
    assert out[-1].finish_reason.value == "length"


def test_abort_mid_speculation_frees_blocks_and_leaves_the_others_identical(tiny_loaded):
    requests = [GenerationRequest(f"a{i}", grounded_prompt(20 + i, 30), greedy(40)) for i in range(3)]
    base = run(spec_engine(tiny_loaded, None), {0: requests[1:]})
    engine = spec_engine(tiny_loaded, NGRAM)
    for request in requests:
        engine.add_request(engine.validate(request))
    outputs: dict = {}
    for step in range(200):
        if step == 4:
            assert engine.abort_request("a0")[-1].finish_reason.value == "cancelled"
        for out in engine.step():
            outputs.setdefault((out.request_id, out.index), []).append(out)
        if not engine.has_unfinished():
            break
    for key in base:
        assert summary(outputs[key]) == summary(base[key])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_seeded_sampling_with_speculation_repeats_alone_and_batched(tiny_loaded):
    params = SamplingParams(max_tokens=30, temperature=0.8, top_k=50, seed=11)
    request = GenerationRequest("x", grounded_prompt(3, 30), params)
    alone = run(spec_engine(tiny_loaded, NGRAM), {0: [request]})[("x", 0)]
    others = [GenerationRequest(f"o{i}", grounded_prompt(40 + i, 20), greedy(25)) for i in range(3)]
    batched = run(spec_engine(tiny_loaded, NGRAM), {0: [*others, request]})[("x", 0)]
    assert summary(batched) == summary(alone)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_inside_an_accepted_run_ends_the_choice_there(tiny_loaded_with_words, include):
    loaded = tiny_loaded_with_words
    ids = grounded_prompt(7, 40)
    free = run(spec_engine(loaded, NGRAM), {0: [GenerationRequest("t", ids, greedy(48))]})[("t", 0)]
    start = accepted_run_position(free) - 1  # a run of 3 or more tokens starts here
    first, second = summary(free)[0][start : start + 2]
    stop = f" w{first} w{second} "  # ends inside the run; min_tokens keeps earlier occurrences from counting
    params = greedy(48, stop=(stop,), include_stop_str_in_output=include, min_tokens=start)
    base = run(spec_engine(loaded, None), {0: [GenerationRequest("t", ids, params)]})[("t", 0)]
    spec = run(spec_engine(loaded, NGRAM), {0: [GenerationRequest("t", ids, params)]})[("t", 0)]
    assert summary(spec) == summary(base)
    tokens, text, reason, stop_reason = summary(spec)
    assert reason.value == "stop_sequence" and stop_reason == stop
    assert tokens == summary(free)[0][: start + 3]  # the token that completes the stop string is the last
    assert text.endswith(stop) if include else not text.endswith(stop.rstrip())
