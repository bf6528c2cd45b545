"""Embed and EmbedStream over a real server with all-MiniLM-L6-v2, checked against transformers' own BertModel."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub
from weir_client import WeirClient

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is playing a guitar.",
    "Someone strums an acoustic guitar on stage.",
    "The stock market fell sharply on Monday.",
]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_related_sentences_are_closer_than_unrelated(weir_client: WeirClient) -> None:
    guitar, strum, stocks = weir_client.embed(SENTENCES).vectors
    assert _cosine(guitar, strum) > _cosine(guitar, stocks) + 0.3


def test_vectors_match_transformers_bert_with_mean_pooling(weir_client: WeirClient, packaged_model_paths: Any) -> None:
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_paths.minilm_dir)
    model = BertModel.from_pretrained(packaged_model_paths.minilm_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    result = weir_client.embed(SENTENCES)
    assert result.model == "all-minilm-l6-v2"
    for ours, theirs in zip(result.vectors, reference.tolist(), strict=True):
        assert len(ours) == 384
        assert _cosine(ours, theirs) >= 0.9999


def test_vectors_are_unit_length_by_default(weir_client: WeirClient) -> None:
    for vector in weir_client.embed(SENTENCES).vectors:
        assert _norm(vector) == pytest.approx(1.0, abs=1e-4)


def test_normalize_off_returns_raw_pooled_vectors(weir_client: WeirClient) -> None:
    raw = weir_client.embed(SENTENCES[:1], normalize=False).vectors[0]
    unit = weir_client.embed(SENTENCES[:1]).vectors[0]
    assert _norm(raw) != pytest.approx(1.0, abs=1e-2)
    assert _cosine(raw, unit) == pytest.approx(1.0, abs=1e-5)


def test_dimensions_truncates_and_renormalizes(weir_client: WeirClient) -> None:
    full = weir_client.embed(SENTENCES[:1]).vectors[0]
    short = weir_client.embed(SENTENCES[:1], dimensions=64).vectors[0]
    assert len(short) == 64
    assert _norm(short) == pytest.approx(1.0, abs=1e-4)
    assert _cosine(short, full[:64]) == pytest.approx(1.0, abs=1e-5)


def test_token_id_inputs_match_text_inputs(weir_client: WeirClient) -> None:
    ids = [t.token_ids for t in weir_client.tokenize(SENTENCES, model="all-minilm-l6-v2")]
    by_ids = weir_client.embed(token_ids=ids)
    by_text = weir_client.embed(SENTENCES)
    for a, b in zip(by_ids.vectors, by_text.vectors, strict=True):
        assert _cosine(a, b) == pytest.approx(1.0, abs=1e-6)
    assert by_ids.prompt_tokens == sum(map(len, ids))


def test_truncate_cuts_long_inputs(weir_client: WeirClient) -> None:
    long_text = "word " * 600  # over MiniLM's 512 positions
    vector = weir_client.embed([long_text], truncate=True).vectors[0]
    assert len(vector) == 384


def test_embed_stream_answers_each_request_in_order(weir_stub: InferenceServiceStub, weir_client: WeirClient) -> None:
    requests = [pb.EmbedStreamRequest(request=pb.EmbedRequest(texts=[text])) for text in SENTENCES]
    responses = list(weir_stub.EmbedStream(iter(requests)))
    assert len(responses) == len(SENTENCES)
    expected = weir_client.embed(SENTENCES).vectors
    for response, vector in zip(responses, expected, strict=True):
        assert _cosine(list(response.response.embeddings[0].values), vector) == pytest.approx(1.0, abs=1e-6)
