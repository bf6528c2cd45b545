"""GGUF layers keep weights packed and compute what dequantize-then-matmul computes (CPU paths; the Triton
path has its own tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf_blocks import random_rows

from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.kernels.gguf_dequant import PACKED_TYPES, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, dequantize
from weir_server.layers.gguf_weights import (
    DenseRows,
    Int4Rows,
    Int8BlockRows,
    PackedRows,
    int4_available,
    int4_grid,
)
from weir_server.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from weir_server.layers.quantized_linear import GGUFEmbedding, GGUFLinear, QuantizedTensor, quantize_gguf_layers

INT4 = [Q4_0, Q4_1, Q4_K]


def packed(qtype, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    return QuantizedTensor(random_rows(qtype, rows, cols, seed), qtype, cols)


def dense(tensor: QuantizedTensor) -> torch.Tensor:
    return dequantize(tensor.raw, tensor.qtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def materialize(module: torch.nn.Module) -> torch.nn.Module:
    return module.to_empty(device="cpu")


@pytest.mark.parametrize("qtype", INT4, ids=lambda t: t.name)
def test_int4_grid_reproduces_the_dequantized_weights(qtype):
    raw = random_rows(qtype, 8, 512)
    q, scale, zero = int4_grid(raw, qtype)
    restored = ((q.float() - 8).reshape(8, -1, 32) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(8, 512)
    torch.testing.assert_close(restored, dequantize(raw, qtype), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not int4_available(), reason="this torch lacks the CPU int4 matmul")
@pytest.mark.parametrize("qtype", INT4, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 7])
def test_int4_rows_match_dequantize_then_matmul(qtype, m):
    raw = random_rows(qtype, 64, 512)
    x = torch.randn(m, 512)
    got = Int4Rows(raw, qtype, torch.float32).matmul(x)
    assert relative_error(got, x @ dequantize(raw, qtype).t()) < 1e-5


@pytest.mark.parametrize("qtype", list(PACKED_TYPES.values()), ids=lambda t: t.name)
def test_packed_rows_on_the_cpu_match_dequantize_then_matmul_in_tiles(qtype, monkeypatch):
    monkeypatch.setattr("weir_server.layers.gguf_weights._TILE_WEIGHTS", 3 * 512)  # several tiles, one ragged
    raw = random_rows(qtype, 10, 512)
    x = torch.randn(2, 3, 512)
    got = PackedRows(raw, qtype, 512).matmul(x)
    assert got.shape == (2, 3, 10)
    assert relative_error(got, x @ dequantize(raw, qtype).t()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [Q8_0, Q5_K, Q6_K], ids=lambda t: t.name)
def test_int8_block_rows_match_dequantize_then_matmul(qtype, dtype, monkeypatch):
    monkeypatch.setattr("weir_server.layers.gguf_weights._TILE_WEIGHTS", 4 * 512)
    raw = random_rows(qtype, 10, 512)
    x = torch.randn(3, 512)
    rows = Int8BlockRows(raw, qtype, dtype)
    assert relative_error(rows.matmul(x.to(dtype)), x @ dequantize(raw, qtype).t()) < (
        1e-6 if dtype == torch.float32 else 1e-2
    )
    if dtype == torch.float32:  # an embedding lookup reads the very weights
        index = torch.tensor([[9, 0], [4, 4]])
        assert torch.equal(rows.dequantize_rows(index), dequantize(raw, qtype)[index])


def test_quantized_tensor_reads_as_floats_in_a_layer_that_knows_nothing_of_gguf():
    weight = packed(Q6_K, 16, 256)
    layer = RowParallelLinear(256, 16)
    layer.weight_loader(layer.weight, weight, "down")
    torch.testing.assert_close(layer.weight.data, dense(weight))


def test_fused_qkv_of_mixed_types_keeps_one_part_per_run_of_a_type():
    with torch.device("meta"):
        base = QKVParallelLinear(256, head_dim=16, num_heads=4, num_kv_heads=2, bias=True)
    layer = materialize(GGUFLinear(base))
    q, k, v = packed(Q4_K, 64, 256, 1), packed(Q4_K, 32, 256, 2), packed(Q6_K, 32, 256, 3)
    bias = torch.randn(128)
    for shard, tensor in (("q", q), ("v", v), ("k", k)):  # any arrival order
        layer.weight_loader(layer.weight, tensor, f"{shard}_proj", shard)
    for shard, part in zip("qkv", bias.split([64, 32, 32]), strict=True):
        layer.weight_loader(layer.bias, part, f"{shard}_proj.bias", shard)
    assert [(type(p), p.rows) for p in layer.parts] in (
        [(Int4Rows, 96), (Int8BlockRows, 32)],
        [(PackedRows, 96), (Int8BlockRows, 32)],  # a torch without the CPU int4 matmul
    )
    x = torch.randn(3, 256)
    expected = F.linear(x, torch.cat([dense(q), dense(k), dense(v)]), bias)
    assert relative_error(layer(x), expected) < 1e-5


def test_float_shards_become_dense_rows_beside_packed_ones():
    with torch.device("meta"):
        base = MergedColumnParallelLinear(64, [32, 32])
    layer = materialize(GGUFLinear(base))
    gate, up = packed(Q8_0, 32, 64), torch.randn(32, 64)
    layer.weight_loader(layer.weight, gate, "gate", 0)
    layer.weight_loader(layer.weight, up, "up", 1)
    assert [type(p) for p in layer.parts] == [Int8BlockRows, DenseRows]
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ torch.cat([dense(gate), up]).t())


def test_a_shape_that_does_not_fit_names_both_shapes():
    with torch.device("meta"):
        base = RowParallelLinear(256, 16)
    layer = materialize(GGUFLinear(base))
    with pytest.raises(ValueError, match=r"down: checkpoint shape \(16, 512\) != model \(16, 256\)"):
        layer.weight_loader(layer.weight, packed(Q4_0, 16, 512), "down")


class _Tied(torch.nn.Module):
    """An embedding and the LM head that shares its weight."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab, 256)
        self.lm_head = ParallelLMHead(vocab, 256)
        self.lm_head.weight = self.embed_tokens.weight


def _tied_on_meta(vocab: int) -> _Tied:
    with torch.device("meta"):
        return _Tied(vocab)


def test_embedding_dequantizes_the_gathered_rows_and_a_tied_head_shares_them():
    model = _tied_on_meta(100)
    assert quantize_gguf_layers(model) == 2
    model = materialize(model)
    assert isinstance(model.embed_tokens, GGUFEmbedding) and model.lm_head.weight is model.embed_tokens.weight
    table = packed(Q6_K, 100, 256)
    model.embed_tokens.weight_loader(model.embed_tokens.weight, table, "embed")
    ids = torch.tensor([3, 99, 0, 3])
    torch.testing.assert_close(model.embed_tokens(ids), dense(table)[ids])
    hidden = torch.randn(2, 256)
    assert relative_error(model.lm_head.compute_logits(hidden), hidden @ dense(table).t()) < 1e-6
    assert model.lm_head.parts[0] is model.embed_tokens.parts[0]  # one copy of the matrix


@pytest.mark.skipif(cpu_ops() is None, reason="the C++ CPU ops are not built here")
@pytest.mark.parametrize("qtype", [Q8_0, Q6_K], ids=lambda t: t.name)
def test_a_bf16_tied_head_holds_its_rows_once_in_the_op_layout_and_lookups_read_them_there(qtype):
    """A tied Q8_0 head (SmolLM2's) was held twice, as the op's layout for the head and as plain int8 rows for
    the embedding's lookups; the lookups now dequantize the op layout's blocks of 8 rows: the same values."""

    model = _tied_on_meta(104)
    quantize_gguf_layers(model)
    model = materialize(model.to(torch.bfloat16))
    table = packed(qtype, 104, 256)
    model.embed_tokens.weight_loader(model.embed_tokens.weight, table, "embed")
    (rows,) = model.lm_head.parts
    assert rows.packed is not None and rows.qs is None and rows.scales is None  # one copy, the op's
    ids = torch.tensor([[3, 103], [0, 3], [57, 8]])
    assert torch.equal(model.embed_tokens(ids), dense(table)[ids].to(torch.bfloat16))
    hidden = torch.randn(2, 256, dtype=torch.bfloat16)
    assert relative_error(model.lm_head.compute_logits(hidden).float(), hidden.float() @ dense(table).t()) < 1e-2


def test_layers_hold_quantized_weights_not_floats():
    with torch.device("meta"):
        base = MergedColumnParallelLinear(512, [256, 256])
    layer = materialize(GGUFLinear(base))
    for shard, qtype in ((0, Q4_K), (1, Q6_K)):
        layer.weight_loader(layer.weight, packed(qtype, 256, 512, shard), "gate_up", shard)
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held < 512 * 512 * 1.25  # int4 or int8 quants and per-group scales: under a third of float32
