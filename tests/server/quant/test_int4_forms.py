"""The 4-bit weight's packings and CPU forms against the plain dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch

from weir_server.kernels.int4_matmul import dequantize_int4, int4_matmul_reference, pack_rows, unpack_rows
from weir_server.layers.int4_checkpoint import AWQ_ORDER, GPTQ_ORDER, pack_columns, unpack_columns
from weir_server.layers.int4_linear import CpuInt4, PackedInt4


def random_weight(k: int, n: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 17, (k // group_size, n), generator=gen, dtype=torch.uint8)
    scales = torch.rand((k // group_size, n), generator=gen) * 0.01 + 0.001
    return q, zeros, scales


@pytest.mark.parametrize("order", [AWQ_ORDER, GPTQ_ORDER])
def test_column_packing_round_trips(order: tuple[int, ...]) -> None:
    values = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_columns(values, order)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert torch.equal(unpack_columns(packed, order), values)


def test_awq_order_puts_column_1_in_the_fifth_nibble() -> None:
    values = torch.zeros((1, 8), dtype=torch.uint8)
    values[0, 1] = 0xF
    assert int(pack_columns(values, AWQ_ORDER)[0, 0]) == 0xF << 16


def test_row_packing_round_trips() -> None:
    q = torch.randint(0, 16, (64, 24), dtype=torch.uint8)
    assert torch.equal(unpack_rows(pack_rows(q)), q)


def test_cpu_int4_form_matches_the_reference() -> None:
    q, zeros, scales = random_weight(256, 96, 64)
    x = torch.randn(5, 256)
    expected = int4_matmul_reference(x, pack_rows(q), scales, zeros.float(), 64)
    torch.testing.assert_close(CpuInt4(q, zeros, scales, 64)(x), expected, atol=1e-4, rtol=1e-4)


def test_packed_form_with_interleaved_groups_matches_the_reference() -> None:
    q, zeros, scales = random_weight(128, 40, 32)
    g_idx = (torch.arange(128) // 32)[torch.randperm(128)].to(torch.int32)
    x = torch.randn(3, 128)
    expected = x @ dequantize_int4(pack_rows(q), scales, zeros, 32, g_idx)
    torch.testing.assert_close(PackedInt4(q, zeros, scales, g_idx, 32)(x), expected, atol=1e-5, rtol=1e-5)
