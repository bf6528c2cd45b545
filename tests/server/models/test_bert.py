"""Our BERT encoder and EmbeddingEngine against transformers' BertModel, tiny random and packaged MiniLM."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from paged_runner import save_tiny_tokenizer
from transformers import BertConfig, BertForMaskedLM, BertModel

from weir_server.config import ModelConfig
from weir_server.engine.embedding_engine import EmbeddingEngine
from weir_server.errors import InvalidRequestError
from weir_server.models.loader import load_model

VOCAB = 120
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=80,
    max_position_embeddings=64,
    type_vocab_size=2,
)


def save_tiny_bert(directory, model_class=BertModel):
    torch.manual_seed(0)
    hf_model = model_class(BertConfig(**TINY)).eval()
    hf_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)
    return hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    hf_model = save_tiny_bert(directory)
    return hf_model, load_model(ModelConfig(str(directory), device="cpu"))


def padded(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
    return input_ids, mask


BATCH = [[1, 5, 9, 44, 2], [1, 7, 2], [1, *range(10, 40), 2]]


def test_token_states_match_transformers_on_a_padded_batch(tiny):
    hf_model, loaded = tiny
    assert loaded.task == "embed" and loaded.pooling == "mean" and loaded.max_model_len == 64
    input_ids, mask = padded(BATCH)
    types = torch.zeros_like(input_ids)
    types[0, 3:] = 1
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = loaded.model(input_ids, mask, types)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)


def test_masked_lm_checkpoints_with_bert_prefix_load(tmp_path):
    hf_model = save_tiny_bert(tmp_path, BertForMaskedLM)
    loaded = load_model(ModelConfig(str(tmp_path), device="cpu"))
    assert loaded.architecture == "BertForMaskedLM"
    input_ids, mask = padded(BATCH[:2])
    with torch.no_grad():
        expected = hf_model.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        ours = loaded.model(input_ids, mask)
    torch.testing.assert_close(ours[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


async def test_concurrent_calls_are_pooled_like_separate_ones(tiny):
    _, loaded = tiny
    engine = EmbeddingEngine(loaded)
    try:
        together = await asyncio.gather(
            engine.embed(BATCH, None, normalize=True, dimensions=None),
            engine.embed([BATCH[1]], "cls", normalize=False, dimensions=None),
            engine.embed([BATCH[2]], "last", normalize=True, dimensions=8),
        )
        mean_alone = await engine.embed([BATCH[0]], "mean", normalize=True, dimensions=None)
    finally:
        await engine.shutdown()
    assert len(together[0]) == 3 and len(together[0][0]) == TINY["hidden_size"]
    torch.testing.assert_close(torch.tensor(together[0][0]), torch.tensor(mean_alone[0]), atol=1e-5, rtol=1e-5)

    input_ids, mask = padded([BATCH[1]])
    with torch.no_grad():
        states = loaded.model(input_ids, mask)
    torch.testing.assert_close(torch.tensor(together[1][0]), states[0, 0], atol=1e-5, rtol=1e-5)

    truncated = torch.tensor(together[2][0])
    assert truncated.shape == (8,)
    torch.testing.assert_close(truncated.norm(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("token_ids", "dimensions", "field"),
    [
        ([], None, "token_ids"),
        ([[1, 2], []], None, "token_ids[1]"),
        ([list(range(1, 66))], None, "token_ids[0]"),
        ([[1, VOCAB]], None, "token_ids[0]"),
        ([[1, 2]], 0, "dimensions"),
        ([[1, 2]], TINY["hidden_size"] + 1, "dimensions"),
    ],
)
async def test_invalid_inputs_are_rejected_naming_the_field(tiny, token_ids, dimensions, field):
    engine = EmbeddingEngine(tiny[1])
    try:
        with pytest.raises(InvalidRequestError) as caught:
            await engine.embed(token_ids, None, normalize=True, dimensions=dimensions)
    finally:
        await engine.shutdown()
    assert caught.value.field == field


async def test_texts_field_is_named_when_the_caller_says_so(tiny):
    engine = EmbeddingEngine(tiny[1])
    try:
        with pytest.raises(InvalidRequestError) as caught:
            await engine.embed([[]], None, normalize=True, dimensions=None, input_field="texts")
    finally:
        await engine.shutdown()
    assert caught.value.field == "texts[0]"


@pytest.mark.slow
async def test_minilm_embeddings_match_transformers_mean_pooling():
    loaded = load_model(ModelConfig("all-minilm-l6-v2", device="cpu"))
    texts = [
        "The cat sits outside",
        "A man is playing guitar and singing a song about the weather in the mountains.",
        "Paris is the capital of France.",
    ]
    token_ids = [loaded.tokenizer(t)["input_ids"] for t in texts]
    engine = EmbeddingEngine(loaded)
    try:
        ours = torch.tensor(await engine.embed(token_ids, None, normalize=True, dimensions=None))
    finally:
        await engine.shutdown()

    hf_model = BertModel.from_pretrained(loaded.hf_config.name_or_path).eval()
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = hf_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    cosine = F.cosine_similarity(ours, expected, dim=-1)
    assert (cosine >= 0.9999).all(), cosine
    assert loaded.pooling == "mean"
