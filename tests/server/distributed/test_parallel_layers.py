"""Weight sharding of the parallel layers, checked in one process by building each rank's model in turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_models import save_word_tokenizer
from torch import nn
from transformers import LlamaConfig

from weir_server.config import ModelConfig
from weir_server.distributed import parallel_state
from weir_server.layers.linear import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from weir_server.models.loader import LoadedModel, load_model

VOCAB = 99


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-config")
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ).save_pretrained(directory)
    save_word_tokenizer(directory, VOCAB)
    return directory


def load_as_rank(monkeypatch: pytest.MonkeyPatch, directory: Path, rank: int, size: int) -> LoadedModel:
    """The dummy-weight model as rank `rank` of `size` would build it (no process group is needed to load)."""
    with monkeypatch.context() as patch:
        if size > 1:
            patch.setattr(parallel_state, "_state", parallel_state.ParallelState(rank, size))
        return load_model(ModelConfig(str(directory), load_format="dummy", seed=7, device="cpu"))


def test_single_rank_layers_are_plain_torch_layers(config_dir: Path) -> None:
    model = load_model(ModelConfig(str(config_dir), load_format="dummy", device="cpu")).model
    assert isinstance(model.lm_head, nn.Embedding) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert model.lm_head.weight.shape == (VOCAB, 32)
    assert not dist.is_initialized()


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_its_slice_of_the_same_dummy_weights(
    monkeypatch: pytest.MonkeyPatch, config_dir: Path, size: int
) -> None:
    full = dict(load_as_rank(monkeypatch, config_dir, 0, 1).model.named_parameters())
    head_dim, kv_heads = 8, 2
    for rank in range(size):
        shard = dict(load_as_rank(monkeypatch, config_dir, rank, size).model.named_parameters())
        layer = "model.layers.0."
        # Column-parallel: rows; row-parallel: columns; vocabulary: rows, the last shard padded with zeros.
        per_vocab = -(-VOCAB // size)
        rows = full["model.embed_tokens.weight"][rank * per_vocab : (rank + 1) * per_vocab]
        torch.testing.assert_close(shard["model.embed_tokens.weight"][: len(rows)], rows)
        assert not shard["model.embed_tokens.weight"][len(rows) :].any()
        cols = 48 // size
        down = full[layer + "mlp.down_proj.weight"]
        torch.testing.assert_close(shard[layer + "mlp.down_proj.weight"], down[:, rank * cols : (rank + 1) * cols])
        gate, up = full[layer + "mlp.gate_up_proj.weight"].split(48)
        expected = torch.cat([gate[rank * cols : (rank + 1) * cols], up[rank * cols : (rank + 1) * cols]])
        torch.testing.assert_close(shard[layer + "mlp.gate_up_proj.weight"], expected)
        # q heads are split; KV heads are split, or replicated when there are fewer than ranks.
        qkv = full[layer + "self_attn.qkv_proj.weight"]
        q_local = 4 // size * head_dim
        kv_head = rank * kv_heads // size
        k_full = qkv[32 : 32 + kv_heads * head_dim]
        v_full = qkv[32 + kv_heads * head_dim :]
        kv_local = max(1, kv_heads // size) * head_dim
        expected = torch.cat(
            [
                qkv[rank * q_local : (rank + 1) * q_local],
                k_full[kv_head * head_dim : kv_head * head_dim + kv_local],
                v_full[kv_head * head_dim : kv_head * head_dim + kv_local],
            ]
        )
        torch.testing.assert_close(shard[layer + "self_attn.qkv_proj.weight"], expected)


def test_indivisible_heads_are_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch, config_dir: Path) -> None:
    with pytest.raises(Exception, match="attention heads .* not divisible by the tensor-parallel size"):
        load_as_rank(monkeypatch, config_dir, 0, 3)


def test_parallel_layers_shard_their_features() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel_state, "_state", parallel_state.ParallelState(1, 2))
        column, row, vocab = ColumnParallelLinear(8, 6), RowParallelLinear(6, 8), VocabParallelEmbedding(7, 4)
    assert column.weight.shape == (3, 8) and row.weight.shape == (8, 3)
    assert (vocab.vocab_start, vocab.num_valid, vocab.weight.shape[0]) == (4, 3, 4)
