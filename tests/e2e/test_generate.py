"""Generate over a real server with SmolLM2-135M-Instruct: outputs, sampling controls, logprobs, usage, ids."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub
from weir_client import Completion, WeirClient

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(client: WeirClient, **sampling: object) -> Completion:
    return client.complete(messages=FRANCE, **sampling)  # type: ignore[arg-type]


def test_greedy_chat_answers_paris(weir_client: WeirClient) -> None:
    completion = _chat(weir_client, temperature=0, max_tokens=24)
    assert "Paris" in completion.text
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_equal_seeds_give_equal_samples(weir_client: WeirClient) -> None:
    first = _chat(weir_client, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    second = _chat(weir_client, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    assert first.choices[0].token_ids == second.choices[0].token_ids
    assert first.text == second.text


def test_stop_string_ends_the_choice_and_is_not_emitted(weir_client: WeirClient) -> None:
    completion = _chat(weir_client, temperature=0, max_tokens=24, stop=["Paris"])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop_sequence"
    assert choice.stop_reason == "Paris"
    assert "Paris" not in choice.text
    assert choice.text.strip()


def test_include_stop_str_in_output_keeps_the_stop_string(weir_client: WeirClient) -> None:
    completion = _chat(weir_client, temperature=0, max_tokens=24, stop=["Paris"], include_stop_str_in_output=True)
    assert completion.text.endswith("Paris")
    assert completion.choices[0].stop_reason == "Paris"


def test_max_tokens_finishes_with_length_and_exact_count(weir_client: WeirClient) -> None:
    completion = weir_client.complete("Once upon a time", temperature=0, max_tokens=7, ignore_eos=True)
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.token_ids) == 7
    assert choice.usage is not None and choice.usage.completion_tokens == 7


def test_min_tokens_delays_the_end_of_sequence(weir_client: WeirClient) -> None:
    plain = _chat(weir_client, temperature=0, max_tokens=40)
    assert plain.choices[0].finish_reason == "stop"  # the model ends its short answer by itself
    short = len(plain.choices[0].token_ids)
    forced = _chat(weir_client, temperature=0, max_tokens=40, min_tokens=short + 5)
    assert len(forced.choices[0].token_ids) >= short + 5


def test_n_choices_stream_with_their_indexes(weir_client: WeirClient) -> None:
    chunks = list(weir_client.generate("The weather today is", n=3, temperature=1.0, seed=7, max_tokens=5))
    assert {c.index for c in chunks} == {0, 1, 2}
    finished = [c for c in chunks if c.finished]
    assert sorted(c.index for c in finished) == [0, 1, 2]
    assert all(c.usage is not None and c.usage.completion_tokens == 5 for c in finished)
    firsts = {}
    for chunk in chunks:
        firsts.setdefault(chunk.index, chunk)
    assert all(c.prompt_token_ids for c in firsts.values())


def test_logprobs_have_one_entry_per_token_with_top_alternatives(weir_client: WeirClient) -> None:
    completion = weir_client.complete("The capital of France is", temperature=0, max_tokens=4, logprobs=3)
    choice = completion.choices[0]
    assert len(choice.logprobs) == len(choice.token_ids) == 4
    for token_id, item in zip(choice.token_ids, choice.logprobs, strict=True):
        assert item.token_id == token_id
        assert item.logprob is not None and item.logprob <= 0
        assert len(item.top) == 3
        assert item.top[0].token_id == token_id  # greedy picks the best
        assert [t.logprob for t in item.top] == sorted((t.logprob for t in item.top), reverse=True)
    assert b"".join(item.token_bytes for item in choice.logprobs).decode() == choice.text
    assert "".join(item.token for item in choice.logprobs) == choice.text


def test_prompt_logprobs_cover_every_prompt_token(weir_client: WeirClient) -> None:
    completion = weir_client.complete("The capital of France is", temperature=0, max_tokens=1, prompt_logprobs=2)
    prompt_logprobs = completion.choices[0].prompt_logprobs
    assert prompt_logprobs is not None
    assert [p.token_id for p in prompt_logprobs] == completion.prompt_token_ids
    assert prompt_logprobs[0].logprob is None
    assert all(p.logprob is not None and p.logprob <= 0 for p in prompt_logprobs[1:])
    assert all(len(p.top) == 2 for p in prompt_logprobs[1:])


def test_token_id_input_matches_the_text_prompt(weir_client: WeirClient) -> None:
    ids = weir_client.tokenize("The capital of France is")[0].token_ids
    by_text = weir_client.complete("The capital of France is", temperature=0, max_tokens=6)
    by_ids = weir_client.complete(token_ids=ids, temperature=0, max_tokens=6)
    assert by_ids.prompt_token_ids == ids == by_text.prompt_token_ids
    assert by_ids.choices[0].token_ids == by_text.choices[0].token_ids


def test_chat_input_uses_the_chat_template(weir_client: WeirClient) -> None:
    completion = _chat(weir_client, temperature=0, max_tokens=2)
    rendered = weir_client.detokenize([completion.prompt_token_ids], skip_special_tokens=False)[0]
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_usage_counts_prompt_completion_and_cached_tokens(weir_client: WeirClient) -> None:
    prompt = "Weir caches prefixes. " * 12  # several full KV blocks
    first = weir_client.complete(prompt, temperature=0, max_tokens=3, ignore_eos=True)
    second = weir_client.complete(prompt, temperature=0, max_tokens=3, ignore_eos=True)
    for completion in (first, second):
        usage = completion.choices[0].usage
        assert usage is not None
        assert usage.prompt_tokens == len(completion.prompt_token_ids)
        assert usage.completion_tokens == 3
        assert usage.total_tokens == usage.prompt_tokens + 3
    assert second.choices[0].usage is not None and second.choices[0].usage.cached_tokens > 0


def test_request_id_is_echoed(weir_client: WeirClient) -> None:
    chunks = list(weir_client.generate("Hi", request_id="my-request-7", max_tokens=3))
    assert {c.request_id for c in chunks} == {"my-request-7"}


def test_request_id_is_taken_from_metadata_or_assigned(weir_stub: InferenceServiceStub) -> None:
    request = pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(max_tokens=2))
    from_metadata = list(weir_stub.Generate(request, metadata=(("x-request-id", "from-header"),)))
    assert {m.request_id for m in from_metadata} == {"from-header"}
    assigned = list(weir_stub.Generate(request))
    ids = {m.request_id for m in assigned}
    assert len(ids) == 1 and len(ids.pop()) >= 16


def test_every_message_names_the_model(weir_client: WeirClient) -> None:
    chunks = list(weir_client.generate("Hi", max_tokens=2))
    assert {c.model for c in chunks} == {"smollm2-135m-instruct"}


def test_cancelling_a_stream_frees_its_slot(weir_server: Any, weir_client: WeirClient) -> None:
    engine = weir_server.generate_engine
    stream = weir_client.generate("Count to a thousand:", max_tokens=900, ignore_eos=True)
    next(stream)
    next(stream)
    assert engine.stats().num_running == 1
    stream.close()  # cancels the call
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and engine.stats().num_running + engine.stats().num_waiting:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_deadline_aborts_the_request_in_the_engine(weir_server: Any, weir_stub: InferenceServiceStub) -> None:
    engine = weir_server.generate_engine
    request = pb.GenerateRequest(prompt="Go on:", sampling_params=pb.SamplingParams(max_tokens=900, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as info:
        list(weir_stub.Generate(request, timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and engine.stats().num_running:
        time.sleep(0.05)
    assert engine.stats().num_running == 0
