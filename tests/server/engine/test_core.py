"""EngineCore with a tiny random Llama: batching, preemption, prefix caching and chunked prefill keep greedy output."""

from __future__ import annotations

import pytest
from engine_helpers import greedy, make_engine, prompt, run, run_alone, tokens_of

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import FinishReason, GenerationRequest, SamplingParams
from weir_server.errors import InvalidRequestError, QueueFullError


def _requests(count: int, base_len: int = 5, max_tokens: int = 12) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"r{i}", prompt(i, base_len + 7 * i), greedy(max_tokens + 3 * (i % 3))) for i in range(count)
    ]


def test_continuous_batching_matches_running_each_request_alone(tiny_loaded):
    requests = _requests(6)
    alone = {r.request_id: run_alone(tiny_loaded, r) for r in requests}
    engine = make_engine(tiny_loaded)
    arrivals = {0: requests[:2], 1: requests[2:3], 3: requests[3:5], 7: requests[5:]}
    outputs = run(engine, arrivals)
    for r in requests:
        got = outputs[(r.request_id, 0)]
        assert tokens_of(got) == alone[r.request_id], r.request_id
        assert got[-1].finish_reason is FinishReason.LENGTH
        assert got[-1].usage is not None and got[-1].usage.completion_tokens == r.params.max_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_preemption_under_tiny_kv_budget_completes_every_request_with_same_tokens(tiny_loaded):
    requests = _requests(5, base_len=6, max_tokens=16)
    alone = {r.request_id: run_alone(tiny_loaded, r) for r in requests}
    engine = make_engine(tiny_loaded, num_blocks=16, block_size=4)
    outputs = run(engine, {0: requests})
    assert engine.scheduler.num_preemptions > 0
    for r in requests:
        assert tokens_of(outputs[(r.request_id, 0)]) == alone[r.request_id], r.request_id
        assert sum(o.finished for o in outputs[(r.request_id, 0)]) == 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_second_request_sharing_a_long_prefix_reports_cached_tokens_and_same_output(tiny_loaded):
    shared = prompt(100, 40)
    first = GenerationRequest("a", shared + [7, 8, 9], greedy(6))
    second = GenerationRequest("b", shared + [10, 11], greedy(6))
    expected = run_alone(tiny_loaded, second)
    engine = make_engine(tiny_loaded, block_size=4)
    run(engine, {0: [first]})
    outputs = run(engine, {0: [second]})[("b", 0)]
    assert tokens_of(outputs) == expected
    usage = outputs[-1].usage
    assert usage is not None and usage.cached_tokens == 40 and usage.prompt_tokens == 42
    assert engine.stats().prefix_cache_hit_tokens == 40


def test_identical_prompt_is_never_served_entirely_from_cache(tiny_loaded):
    request = GenerationRequest("a", prompt(5, 16), greedy(4))
    engine = make_engine(tiny_loaded, block_size=4)
    first = tokens_of(run(engine, {0: [request]})[("a", 0)])
    again = run(engine, {0: [GenerationRequest("b", request.prompt_token_ids, greedy(4))]})[("b", 0)]
    assert tokens_of(again) == first
    assert again[-1].usage is not None and again[-1].usage.cached_tokens == 12  # the last block is recomputed


def test_chunked_prefill_of_prompt_longer_than_token_budget_gives_same_tokens(tiny_loaded):
    request = GenerationRequest("long", prompt(7, 150), greedy(8))
    expected = run_alone(tiny_loaded, request, max_num_batched_tokens=512)
    engine = make_engine(tiny_loaded, max_num_batched_tokens=32)
    other = GenerationRequest("short", prompt(8, 5), greedy(20))
    outputs = run(engine, {0: [other], 2: [request]})
    assert tokens_of(outputs[("long", 0)]) == expected
    assert tokens_of(outputs[("short", 0)]) == run_alone(tiny_loaded, other)


def test_n_choices_share_prompt_blocks_and_are_indexed(tiny_loaded):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=3, ignore_eos=True)
    engine = make_engine(tiny_loaded, block_size=4)
    outputs = run(engine, {0: [GenerationRequest("n", prompt(9, 30), params)]})
    assert sorted(outputs) == [("n", 0), ("n", 1), ("n", 2)]
    cached = [outputs[("n", i)][-1].usage.cached_tokens for i in range(3)]
    assert cached[0] == 0 and cached[1] == cached[2] == 28
    assert len({tuple(tokens_of(outputs[("n", i)])) for i in range(3)}) > 1


def test_stop_token_id_finishes_with_stop_and_min_tokens_defers_it(tiny_loaded):
    base = GenerationRequest("base", prompt(1, 5), greedy(6))
    first = run_alone(tiny_loaded, base)[0]
    engine = make_engine(tiny_loaded)
    outputs = run(
        engine,
        {
            0: [
                GenerationRequest("stop", base.prompt_token_ids, greedy(6, stop_token_ids=(first,))),
                GenerationRequest("min", base.prompt_token_ids, greedy(6, stop_token_ids=(first,), min_tokens=3)),
            ]
        },
    )
    assert tokens_of(outputs[("stop", 0)]) == [first]
    assert outputs[("stop", 0)][-1].finish_reason is FinishReason.STOP
    assert first not in tokens_of(outputs[("min", 0)])[:3]
    assert len(tokens_of(outputs[("min", 0)])) >= 3


def test_eos_ends_a_choice_unless_ignore_eos(tiny_loaded):
    engine = make_engine(tiny_loaded)
    # Declare the greedy first token to be EOS, so the choice must end right there.
    params = SamplingParams(max_tokens=5, temperature=0.0)
    request = GenerationRequest("e", prompt(4, 5), params)
    alone = tokens_of(run(engine, {0: [request]})[("e", 0)])
    engine.eos_token_ids = (alone[0],)
    stopped = run(engine, {0: [GenerationRequest("s", request.prompt_token_ids, params)]})[("s", 0)]
    assert tokens_of(stopped) == [alone[0]] and stopped[-1].finish_reason is FinishReason.STOP
    ignored = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    kept = run(engine, {0: [GenerationRequest("i", request.prompt_token_ids, ignored)]})[("i", 0)]
    assert len(tokens_of(kept)) == 5 and kept[-1].finish_reason is FinishReason.LENGTH


def test_max_tokens_is_clamped_to_the_context_left(tiny_loaded):
    engine = make_engine(tiny_loaded)
    request = engine.validate(GenerationRequest("r", prompt(2, 250), greedy(100)))
    assert request.params.max_tokens == 6
    outputs = run(engine, {0: [request]})[("r", 0)]
    assert len(tokens_of(outputs)) == 6 and outputs[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    ("prompt_ids", "field"),
    [([], "prompt"), (list(range(2, 300)), "prompt"), ([5, 10_000], "prompt")],
)
def test_invalid_prompts_are_rejected_naming_the_field(tiny_loaded, prompt_ids, field):
    engine = make_engine(tiny_loaded)
    with pytest.raises(InvalidRequestError) as error:
        engine.validate(GenerationRequest("r", prompt_ids, greedy(4)))
    assert error.value.field == field


def test_prompt_too_long_message_names_the_lengths(tiny_loaded):
    engine = make_engine(tiny_loaded)
    with pytest.raises(InvalidRequestError, match="298 tokens.*256"):
        engine.validate(GenerationRequest("r", list(range(2, 300)), greedy(4)))


def test_waiting_queue_beyond_max_waiting_raises_queue_full(tiny_loaded):
    engine = make_engine(tiny_loaded, max_num_seqs=2, max_waiting=2)
    # Between two steps, free running slots absorb a burst: max_num_seqs + max_waiting requests fit.
    for i in range(4):
        engine.scheduler.check_capacity()
        engine.add_request(GenerationRequest(f"r{i}", prompt(i, 4), greedy(8)))
    with pytest.raises(QueueFullError):
        engine.scheduler.check_capacity()
    engine.step()  # two run, two wait: still full
    assert len(engine.scheduler.running) == 2 and engine.scheduler.num_waiting_requests == 2
    with pytest.raises(QueueFullError):
        engine.scheduler.check_capacity()


def test_abort_frees_blocks_at_once(tiny_loaded):
    engine = make_engine(tiny_loaded)
    engine.add_request(GenerationRequest("r", prompt(3, 20), greedy(50)))
    engine.add_request(GenerationRequest("w", prompt(4, 20), SamplingParams(n=2, max_tokens=50, ignore_eos=True)))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_total_blocks
    aborted = engine.abort_request("r") + engine.abort_request("w")
    assert {(o.request_id, o.index) for o in aborted} == {("r", 0), ("w", 0), ("w", 1)}
    assert all(o.finish_reason is FinishReason.CANCELLED for o in aborted)
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_step_exception_fails_only_that_steps_requests(tiny_loaded, monkeypatch):
    engine = make_engine(tiny_loaded, max_num_seqs=1)
    engine.add_request(GenerationRequest("bad", prompt(1, 6), greedy(3)))
    engine.add_request(GenerationRequest("good", prompt(2, 6), greedy(3)))
    original = engine.runner.execute

    def boom(batch, *rest):
        if any(s.seq.request_id == "bad" for s in batch):
            raise RuntimeError("kaboom")
        return original(batch, *rest)

    monkeypatch.setattr(engine.runner, "execute", boom)
    failed = engine.step()
    assert [(o.request_id, o.finish_reason) for o in failed] == [("bad", FinishReason.ERROR)]
    assert "kaboom" in (failed[0].error or "")
    outputs = run(engine, {})
    assert outputs[("good", 0)][-1].finish_reason is FinishReason.LENGTH
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_prompt_logprobs_come_on_the_first_output_and_survive_chunking(tiny_loaded):
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2, logprobs=1, ignore_eos=True)
    request = GenerationRequest("p", prompt(11, 30), params)
    whole = run(make_engine(tiny_loaded), {0: [request]})[("p", 0)]
    chunked = run(make_engine(tiny_loaded, max_num_batched_tokens=8), {0: [request]})[("p", 0)]
    for outputs in (whole, chunked):
        first = outputs[0].prompt_logprobs
        assert first is not None and len(first) == 30 and first[0].logprob is None
        assert [e.token_id for e in first] == request.prompt_token_ids
        assert all(len(e.top) == 2 and e.logprob is not None for e in first[1:])
        assert all(o.prompt_logprobs is None for o in outputs[1:])
        logprobs = [e for o in outputs for e in (o.logprobs or [])]
        assert [e.token_id for e in logprobs] == tokens_of(outputs) and all(len(e.top) == 1 for e in logprobs)
        # Greedy picks the best token, so the chosen logprob is the top-1 logprob.
        assert all(abs(e.logprob - e.top[0].logprob) < 1e-6 for e in logprobs)
    for a, b in zip(whole[0].prompt_logprobs[1:], chunked[0].prompt_logprobs[1:], strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4


def test_equal_seed_and_prompt_give_equal_samples_also_when_batched(tiny_loaded):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    request = GenerationRequest("seeded", prompt(12, 10), params)
    alone = run_alone(tiny_loaded, request)
    others = [GenerationRequest(f"o{i}", prompt(20 + i, 6 + i), SamplingParams(max_tokens=6)) for i in range(3)]
    batched = run(make_engine(tiny_loaded), {0: others[:2], 1: [request], 2: others[2:]})
    assert tokens_of(batched[("seeded", 0)]) == alone


def test_stop_string_ends_the_choice_and_is_not_in_the_text(tiny_loaded_with_tokenizer):
    loaded = tiny_loaded_with_tokenizer
    ids = loaded.tokenizer.encode("Once upon a time", add_special_tokens=False)
    free = run(make_engine(loaded), {0: [GenerationRequest("free", ids, greedy(24))]})[("free", 0)]
    text = "".join(o.text for o in free)
    assert text == loaded.tokenizer.decode(tokens_of(free))
    stop = text[len(text) // 2 : len(text) // 2 + 5]
    cut = text.index(stop)
    for include in (False, True):
        params = greedy(24, stop=(stop,), include_stop_str_in_output=include)
        outputs = run(make_engine(loaded), {0: [GenerationRequest("s", ids, params)]})[("s", 0)]
        got = "".join(o.text for o in outputs)
        assert got == (text[: cut + len(stop)] if include else text[:cut])
        assert outputs[-1].finish_reason is FinishReason.STOP_SEQUENCE and outputs[-1].stop_reason == stop


def test_a_tensor_parallel_core_is_refused_without_its_workers_publisher(tiny_loaded):
    config = EngineConfig(
        model=ModelConfig("tiny-llama", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=64),
        parallel=ParallelConfig(tensor_parallel_size=2),
    )
    with pytest.raises(ValueError, match="publisher"):
        EngineCore(tiny_loaded, config)
