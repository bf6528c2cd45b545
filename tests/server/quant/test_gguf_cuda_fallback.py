"""Where GGUF rows go by device: on a CPU Q5_0 (llama-quantize's Q4_K fallback for rows of 576) is kept as int8
rows; on CUDA every packed type is kept as planes for the Triton kernel."""

from __future__ import annotations

import pytest
import torch
from gguf_blocks import random_rows

from weir_server.kernels.gguf_dequant import PACKED_TYPES, Q5_0, dequantize
from weir_server.layers.gguf_weights import Int8BlockRows, PlanesRows, rows_for_device


def test_q5_0_rows_on_a_cpu_are_int8_rows():
    raw = random_rows(Q5_0, 16, 64)
    form = rows_for_device(raw, Q5_0, 64, torch.float32)
    assert isinstance(form, Int8BlockRows)
    x = torch.randn(3, 64)
    torch.testing.assert_close(form.matmul(x), x @ dequantize(raw, Q5_0).t(), atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", list(PACKED_TYPES.values()), ids=lambda t: t.name)
def test_every_packed_type_on_cuda_is_kept_as_planes(qtype):
    raw = random_rows(qtype, 16, 256).cuda()
    form = rows_for_device(raw, qtype, 256, torch.float32)
    assert isinstance(form, PlanesRows)
    x = torch.randn(3, 256, device="cuda")
    torch.testing.assert_close(form.matmul(x), x @ dequantize(raw, qtype).t(), atol=1e-4, rtol=1e-4)
    index = torch.tensor([[3, 0]], device="cuda")
    assert torch.equal(form.dequantize_rows(index), dequantize(raw, qtype)[index])
