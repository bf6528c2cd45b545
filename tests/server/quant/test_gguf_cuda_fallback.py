"""A GGUF type the Triton kernel does not read (Q5_0, llama-quantize's Q4_K fallback for rows of 576) is kept as
dequantized rows on CUDA, while the CPU keeps it as int8."""

from __future__ import annotations

import pytest
import torch
from gguf_blocks import random_rows

from weir_server.kernels.gguf_dequant import Q4_K, Q5_0, dequantize
from weir_server.layers.gguf_weights import DenseRows, Int8BlockRows, PackedRows, rows_for_device


def test_q5_0_rows_on_a_cpu_are_int8_rows():
    raw = random_rows(Q5_0, 16, 64)
    form = rows_for_device(raw, Q5_0, 64, torch.float32)
    assert isinstance(form, Int8BlockRows)
    x = torch.randn(3, 64)
    torch.testing.assert_close(form.matmul(x), x @ dequantize(raw, Q5_0).t(), atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_q5_0_rows_on_cuda_are_dequantized_and_q4_k_stays_packed():
    raw = random_rows(Q5_0, 16, 64).cuda()
    form = rows_for_device(raw, Q5_0, 64, torch.float32)
    assert isinstance(form, DenseRows)
    x = torch.randn(3, 64, device="cuda")
    torch.testing.assert_close(form.matmul(x), x @ dequantize(raw, Q5_0).t(), atol=1e-4, rtol=1e-5)
    assert isinstance(rows_for_device(random_rows(Q4_K, 16, 256).cuda(), Q4_K, 256, torch.float32), PackedRows)
