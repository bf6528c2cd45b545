"""The Triton 4-bit grouped matmul (AWQ / GPTQ weights) against dequantize-then-matmul: contiguous groups and
act-order's interleaved ones (g_idx), decode and prefill shapes, on the GPU (marked `gpu`) and, for the kernel's
logic, in the Triton interpreter on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from weir_server.kernels.int4_matmul import int4_matmul, int4_matmul_reference, pack_rows
from weir_server.kernels.testing import TRITON_INSTALLED, run_in_triton_interpreter

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
SHAPES = [(1, 2048, 2048), (7, 96, 256), (16, 512, 8192), (70, 136, 768), (256, 2048, 2048)]  # (M, N, K)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.double(), want.double()
    return ((got64 - want64).norm() / want64.norm().clamp_min(1e-30)).item()


def check(m: int, n: int, k: int, group_size: int, act_order: bool, dtype: torch.dtype, device: str) -> float:
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    groups = k // group_size
    scales = (torch.rand((groups, n), generator=gen) * 0.01 + 0.001).to(device, dtype)
    zeros = torch.randint(0, 17, (groups, n), generator=gen).to(device, dtype)
    g_idx = (
        (torch.arange(k) // group_size)[torch.randperm(k, generator=gen)].to(device, torch.int32) if act_order else None
    )
    qweight = pack_rows(q).to(device)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    want = int4_matmul_reference(x.double(), qweight, scales, zeros, group_size, g_idx)
    out = int4_matmul(x, qweight, scales, zeros, group_size, g_idx)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    return relative_error(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("act_order", [False, True], ids=["groups", "act-order"])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int4_matmul_matches_dequantize_then_matmul(shape, group_size, act_order, dtype):
    assert check(*shape, group_size, act_order, dtype, "cuda") < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4_matmul_captures_in_a_cuda_graph():
    q = torch.randint(0, 16, (512, 128), dtype=torch.uint8)
    qweight, scales = pack_rows(q).cuda(), torch.rand(4, 128, device="cuda", dtype=torch.bfloat16) * 0.01
    zeros = torch.full((4, 128), 8.0, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    int4_matmul(x, qweight, scales, zeros, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_matmul(x, qweight, scales, zeros, 128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = int4_matmul_reference(x.double(), qweight, scales, zeros, 128)
    assert relative_error(out, want) < TOLERANCE[torch.bfloat16]


_INTERPRETED = """
import torch
from test_int4_matmul_kernel import check
for m, n, k, group_size, act_order in [(1, 40, 256, 32, False), (17, 24, 256, 64, True), (3, 16, 128, 128, False)]:
    err = check(m, n, k, group_size, act_order, torch.float32, "cpu")
    assert err < 1e-5, (m, n, k, group_size, act_order, err)
print("ok")
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_int4_matmul_kernel_logic_in_the_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED, os.path.dirname(__file__), timeout=300)
