"""Tokenize, Detokenize and TokenizeStream over a real server."""

from __future__ import annotations

import pytest

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub
from weir_client import WeirClient

pytestmark = pytest.mark.slow

SMOLLM2_IM_START = 1
TEXTS = ["Hello, world!", "Weir serves models over gRPC: héllo 日本 😀"]


def test_tokenize_then_detokenize_round_trips(weir_client: WeirClient) -> None:
    tokenized = weir_client.tokenize(TEXTS)
    assert weir_client.detokenize([t.token_ids for t in tokenized]) == TEXTS


def test_offsets_point_at_each_tokens_characters(weir_client: WeirClient) -> None:
    text = "The quick brown fox"
    result = weir_client.tokenize(text, return_offsets=True)[0]
    assert result.offsets is not None and len(result.offsets) == len(result.token_ids)
    assert "".join(text[start:end] for start, end in result.offsets) == text
    assert [text[s:e] for s, e in result.offsets] == result.tokens


def test_default_tokenizer_is_the_generation_models(weir_stub: InferenceServiceStub) -> None:
    response = weir_stub.Tokenize(pb.TokenizeRequest(texts=["hi"]))
    assert response.model == "smollm2-135m-instruct"
    assert response.max_model_len == 1024


def test_embedding_model_adds_its_special_tokens_unless_told_not_to(weir_client: WeirClient) -> None:
    with_special = weir_client.tokenize("hello", model="all-minilm-l6-v2")[0]
    without = weir_client.tokenize("hello", model="all-minilm-l6-v2", add_special_tokens=False)[0]
    assert with_special.tokens == ["[CLS]", "hello", "[SEP]"]
    assert without.tokens == ["hello"]


def test_detokenize_keeps_special_tokens_when_asked(weir_client: WeirClient) -> None:
    ids = [SMOLLM2_IM_START, *weir_client.tokenize("hi")[0].token_ids]  # typed "<|im_start|>" would be text
    assert weir_client.detokenize([ids], skip_special_tokens=False) == ["<|im_start|>hi"]
    assert weir_client.detokenize([ids]) == ["hi"]


def test_tokenize_stream_answers_each_message_in_order(weir_stub: InferenceServiceStub) -> None:
    ids = list(weir_stub.Tokenize(pb.TokenizeRequest(texts=["abc"])).results[0].token_ids)
    requests = [
        pb.TokenizeStreamRequest(tokenize=pb.TokenizeRequest(texts=["abc"])),
        pb.TokenizeStreamRequest(detokenize=pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=ids)])),
        pb.TokenizeStreamRequest(tokenize=pb.TokenizeRequest(texts=["x", "y z"])),
    ]
    responses = list(weir_stub.TokenizeStream(iter(requests)))
    assert [r.WhichOneof("response") for r in responses] == ["tokenize", "detokenize", "tokenize"]
    assert list(responses[0].tokenize.results[0].token_ids) == ids
    assert list(responses[1].detokenize.texts) == ["abc"]
    assert len(responses[2].tokenize.results) == 2
