"""WeirClient and AsyncWeirClient against the real test server: results, error codes, deadlines."""

from __future__ import annotations

import grpc
import pytest

from weir_client import AsyncWeirClient, Completion, WeirClient, WeirClientError

pytestmark = pytest.mark.slow


def test_sync_generate_streams_chunks_ending_with_usage(weir_client: WeirClient) -> None:
    chunks = list(weir_client.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True))
    assert chunks[0].prompt_token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert not any(c.finished for c in chunks[:-1])
    assert sum(len(c.token_ids) for c in chunks) == 4


def test_sync_complete_joins_the_stream(weir_client: WeirClient) -> None:
    completion = weir_client.complete("Hello", max_tokens=4, temperature=0, ignore_eos=True)
    streamed = "".join(c.text for c in weir_client.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True))
    assert isinstance(completion, Completion)
    assert completion.text == streamed


def test_sync_health_and_models(weir_client: WeirClient) -> None:
    assert weir_client.health() == "SERVING"
    assert weir_client.health("weir.v1.InferenceService") == "SERVING"
    assert {m.task for m in weir_client.list_models()} == {"generate", "embed"}


def test_errors_carry_code_message_and_field(weir_client: WeirClient) -> None:
    with pytest.raises(WeirClientError) as info:
        weir_client.complete("Hi", temperature=5.0)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "sampling_params.temperature"
    assert "temperature" in error.message


def test_unknown_model_raises_not_found(weir_client: WeirClient) -> None:
    with pytest.raises(WeirClientError) as info:
        weir_client.tokenize("x", model="missing-model")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.field == "model"


def test_deadline_raises_deadline_exceeded(weir_client: WeirClient) -> None:
    with pytest.raises(WeirClientError) as info:
        list(weir_client.generate("Go on:", max_tokens=900, ignore_eos=True, timeout=0.3))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_closes_as_context_manager(weir_target: str) -> None:
    with WeirClient(weir_target) as client:
        assert client.detokenize([[28120]]) == ["hello"]
    with pytest.raises(ValueError):  # grpc refuses calls on a closed channel
        client.detokenize([[28120]])


async def test_async_generate_streams_chunks(weir_target: str) -> None:
    async with AsyncWeirClient(weir_target, timeout=120) as client:
        chunks = [c async for c in client.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True)]
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 4


async def test_async_client_matches_the_sync_client(weir_target: str, weir_client: WeirClient) -> None:
    async with AsyncWeirClient(weir_target, timeout=120) as client:
        completion = await client.complete(messages=[{"role": "user", "content": "Hi!"}], max_tokens=5, temperature=0)
        embeddings = await client.embed(["a", "b"])
        tokens = await client.tokenize("hello world", return_offsets=True)
        texts = await client.detokenize([tokens[0].token_ids])
        models = await client.list_models()
        health = await client.health()
    sync_completion = weir_client.complete(messages=[{"role": "user", "content": "Hi!"}], max_tokens=5, temperature=0)
    assert completion.text == sync_completion.text
    assert len(embeddings.vectors) == 2 and len(embeddings.vectors[0]) == 384
    assert tokens[0].offsets == [(0, 5), (5, 11)]
    assert texts == ["hello world"]
    assert len(models) == 2 and health == "SERVING"


async def test_async_errors_carry_codes(weir_target: str) -> None:
    async with AsyncWeirClient(weir_target) as client:
        with pytest.raises(WeirClientError) as info:
            await client.embed([])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "texts"
        with pytest.raises(WeirClientError) as info:
            async for _ in client.generate("Go on:", max_tokens=900, ignore_eos=True, timeout=0.3):
                pass
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_async_stream_closed_early_cancels_the_request(weir_target: str, weir_server: object) -> None:
    import asyncio

    engine = weir_server.generate_engine  # type: ignore[attr-defined]
    async with AsyncWeirClient(weir_target) as client:
        stream = client.generate("Count:", max_tokens=900, ignore_eos=True)
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(200):
        if engine.stats().num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().num_running == 0


def test_logit_bias_and_regex_reach_the_server(weir_client: WeirClient) -> None:
    words = ["red", "blue"]
    token_ids = [t.token_ids for t in weir_client.tokenize(words, add_special_tokens=False)]
    assert all(len(ids) == 1 for ids in token_ids), token_ids  # one token each, so a bias on it picks the word
    for word, (token_id,) in zip(words, token_ids, strict=True):
        completion = weir_client.complete(
            "My favourite colour is", regex="(red|blue)", logit_bias={token_id: 100}, max_tokens=4, temperature=0
        )
        assert completion.text == word
