"""The Triton GGUF matmul against dequantize-then-matmul, for every packed type, prefill and decode shapes: on
the GPU (marked `gpu`) and, for the kernel's logic, in the Triton interpreter on the CPU."""

from __future__ import annotations

import os

import pytest
import torch
from gguf_blocks import random_rows

from weir_server.kernels.gguf_dequant import PACKED_TYPES, Q4_K, Q6_K, TRITON_TYPES
from weir_server.kernels.gguf_matmul import gguf_matmul, gguf_matmul_reference
from weir_server.kernels.testing import TRITON_INSTALLED, run_in_triton_interpreter

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
SHAPES = [(1, 96, 512), (5, 64, 256), (70, 130, 768)]  # (M, N, K): decode, small batch, prefill with ragged N


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.double(), want.double()
    return ((got64 - want64).norm() / want64.norm().clamp_min(1e-30)).item()


def check(qtype, m: int, n: int, k: int, dtype: torch.dtype, device: str) -> float:
    raw = random_rows(qtype, n, k, seed=m + n).to(device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(device, dtype)
    want = gguf_matmul_reference(x.double(), raw, qtype)
    got = gguf_matmul(x, raw, qtype)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.isfinite(got).all()
    return relative_error(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", [t for t in PACKED_TYPES.values() if t.id in TRITON_TYPES], ids=lambda t: t.name)
def test_gguf_matmul_matches_dequantize_then_matmul(qtype, shape, dtype):
    k = shape[2] if qtype.block_size == 32 or shape[2] % 256 == 0 else 512
    assert check(qtype, shape[0], shape[1], k, dtype, "cuda") < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gguf_matmul_captures_in_a_cuda_graph():
    raw = random_rows(Q4_K, 128, 512).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    gguf_matmul(x, raw, Q4_K)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gguf_matmul(x, raw, Q4_K)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert relative_error(out, gguf_matmul_reference(x.double(), raw, Q4_K)) < TOLERANCE[torch.bfloat16]


_INTERPRETED = """
import torch
from test_gguf_matmul_kernel import check
from weir_server.kernels.gguf_dequant import PACKED_TYPES, TRITON_TYPES
for qtype in (t for t in PACKED_TYPES.values() if t.id in TRITON_TYPES):
    for m in (1, 17):
        err = check(qtype, m, 40, 256, torch.float32, "cpu")
        assert err < 1e-5, (qtype.name, m, err)
print("ok")
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_gguf_matmul_kernel_logic_in_the_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED, os.path.dirname(__file__), timeout=300)


def test_rows_that_do_not_fit_k_are_refused():  # before anything needs Triton or a GPU
    with pytest.raises(ValueError, match="does not fit"):
        gguf_matmul(torch.randn(1, 512), random_rows(Q6_K, 4, 256), Q6_K)
