"""The official openai SDK against the gateway over a real Weir server with the packaged models."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from gateway_cases import malformed_requests
from gateway_support import RunningGateway, http, start_gateway

from weir_gateway.config import GatewayConfig

pytestmark = pytest.mark.slow

GEN, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"
FRANCE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
MAX_BODY = 256 * 1024


@pytest.fixture(scope="session")
def real_gateway(background, weir_target: str) -> Iterator[RunningGateway]:
    config = GatewayConfig(backends=(weir_target,), max_body_bytes=MAX_BODY, max_tokens=256)
    running = background.run(start_gateway(config))
    yield running
    background.run(running.runner.cleanup())


@pytest.fixture(scope="session")
def client(real_gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(real_gateway: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=real_gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=GEN, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert completion.model == GEN
    assert completion.system_fingerprint
    choice = completion.choices[0]
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens <= 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_token_id_prompt(client: openai.OpenAI) -> None:
    ids = http("POST", client.base_url.join("/tokenize").__str__(), {"model": GEN, "prompt": "Hello there"}).json()
    completion = client.completions.create(model=GEN, prompt=ids["tokens"], max_tokens=3, temperature=0)
    assert completion.usage.prompt_tokens == ids["count"]


async def test_streamed_completion_matches_and_reports_usage(
    client: openai.OpenAI, aclient: openai.AsyncOpenAI
) -> None:
    args = {"model": GEN, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    whole = client.completions.create(**args)
    stream = await aclient.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])


def test_chat(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=GEN, messages=FRANCE, max_tokens=24, temperature=0)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    message = completion.choices[0].message
    assert message.role == "assistant" and "Paris" in message.content
    assert completion.usage.prompt_tokens > 10


def test_chat_content_parts_are_joined(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    messages = [{"role": "user", "content": parts}]
    completion = client.chat.completions.create(model=GEN, messages=messages, max_tokens=4, temperature=0)
    assert completion.choices[0].message.content


async def test_chat_stream(client: openai.OpenAI, aclient: openai.AsyncOpenAI) -> None:
    args = {"model": GEN, "messages": FRANCE, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**args)
    chunks = [c async for c in await aclient.chat.completions.create(**args, stream=True)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_stream_n2_has_indexes_and_one_finish_each(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=GEN, messages=FRANCE, max_tokens=4, n=2, temperature=1.0, seed=7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1]
    assert chunks[-1].choices == [] and 2 <= chunks[-1].usage.completion_tokens <= 8


def test_completions_list_of_prompts_streams_offset_indexes(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=GEN, prompt=["Hello", "The sky is"], n=2, max_tokens=3, stream=True)
    finished = sorted(c.choices[0].index for c in stream if c.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=GEN, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    count = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0


def test_echo_with_logprobs_includes_the_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=GEN, prompt="Hello world", max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    choice = completion.choices[0]
    assert choice.text.startswith("Hello world")
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=GEN, messages=FRANCE, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    args = {"model": GEN, "messages": FRANCE, "max_tokens": 16, "temperature": 0}
    text = client.chat.completions.create(**args).choices[0].message.content
    words = text.split()
    assert len(words) >= 3
    stop = words[2]
    stopped = client.chat.completions.create(**args, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == text[: text.index(stop)]


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    as_float = client.embeddings.create(model=EMBED, input=["hello", "world"], encoding_format="float")
    as_base64 = client.embeddings.create(model=EMBED, input=["hello", "world"])  # the SDK asks for base64
    assert [d.index for d in as_float.data] == [0, 1]
    for a, b in zip(as_float.data, as_base64.data, strict=True):
        assert len(a.embedding) == 384
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
        assert abs(np.linalg.norm(a.embedding) - 1) < 1e-3
    assert as_float.usage.prompt_tokens > 0


def test_embeddings_dimensions_and_token_input(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=EMBED, input=[[101, 7592, 102]], dimensions=32, encoding_format="float")
    assert len(reply.data[0].embedding) == 32


def test_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {GEN, EMBED} <= ids
    assert client.models.retrieve(GEN).id == GEN
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors_arrive_as_sdk_exception_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=GEN, messages=FRANCE, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError) as unknown_tool:
        tools = [{"type": "function", "function": {"name": "f"}}]
        client.chat.completions.create(
            model=GEN, messages=FRANCE, tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}
        )
    assert unknown_tool.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as out_of_vocabulary:
        client.chat.completions.create(model=GEN, messages=FRANCE, max_tokens=2, logit_bias={"999999999": 5})
    assert out_of_vocabulary.value.body["param"] == "logit_bias"


def test_bad_api_key_is_authentication_error(background, weir_target: str) -> None:
    gateway = background.run(start_gateway(GatewayConfig(backends=(weir_target,), api_keys=("right",))))
    try:
        wrong = openai.OpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=gateway.url + "/v1", api_key="right", max_retries=0)
        assert right.models.list().data
    finally:
        background.run(gateway.runner.cleanup())


def test_prompt_longer_than_the_context_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=GEN, prompt=[1] * 5000, max_tokens=2)


def test_tokenize_and_detokenize_round_trip(real_gateway: RunningGateway) -> None:
    tokens = http("POST", real_gateway.url + "/tokenize", {"model": GEN, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] > 0
    text = http("POST", real_gateway.url + "/detokenize", {"model": GEN, "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"


def test_malformed_bodies_get_4xx_and_everything_keeps_serving(real_gateway: RunningGateway,
                                                               client: openai.OpenAI) -> None:  # fmt: skip
    cases = malformed_requests(GEN, EMBED, MAX_BODY)
    for case in cases:
        reply = http(case.method, real_gateway.url + case.path, case.body)
        assert reply.status == case.status, (case.name, reply.body[:300])
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}, case.name
    assert len(cases) >= 30
    assert http("GET", real_gateway.url + "/health").status == 200
    assert client.completions.create(model=GEN, prompt="Hi", max_tokens=2).choices[0].text is not None


async def test_concurrent_async_requests(aclient: openai.AsyncOpenAI) -> None:
    replies = await asyncio.gather(
        *(aclient.completions.create(model=GEN, prompt=f"Number {i}:", max_tokens=3) for i in range(4))
    )
    assert all(r.choices[0].finish_reason for r in replies)


def test_client_disconnect_frees_the_engine_slot(real_gateway: RunningGateway, weir_server) -> None:
    parts = urlsplit(real_gateway.url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = {"model": GEN, "prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    assert weir_server.generate_engine.stats().num_running == 1
    conn.close()
    deadline = time.monotonic() + 5
    while weir_server.generate_engine.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert weir_server.generate_engine.stats().num_running == 0
