"""GGUF rows as planes, and the Triton matmul that reads them, against dequantize-then-matmul: every packed type,
decode, split-K and prefill tiles, on the GPU (marked `gpu`) and, for the kernel's logic, in the Triton
interpreter on the CPU."""

from __future__ import annotations

import os

import pytest
import torch
from gguf_blocks import random_rows

from weir_server.kernels.gguf_dequant import PACKED_TYPES, Q4_K, Q6_K, dequantize
from weir_server.kernels.gguf_matmul import gguf_matmul, gguf_matmul_reference
from weir_server.kernels.gguf_planes import dequantize_planes, to_planes
from weir_server.kernels.testing import TRITON_INSTALLED, run_in_triton_interpreter

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
SHAPES = [(1, 96, 512), (5, 64, 256), (70, 130, 768)]  # (M, N, K): decode, small batch, prefill with ragged N
TYPES = list(PACKED_TYPES.values())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.double(), want.double()
    return ((got64 - want64).norm() / want64.norm().clamp_min(1e-30)).item()


def check(qtype, m: int, n: int, k: int, dtype: torch.dtype, device: str, tiles=None) -> float:
    planes = to_planes(random_rows(qtype, n, k, seed=m + n).to(device), qtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(device, dtype)
    want = gguf_matmul_reference(x.double(), planes)
    got = gguf_matmul(x, planes, tiles)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.isfinite(got).all()
    return relative_error(got, want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_planes_dequantize_to_the_same_bits_as_the_blocks(qtype):
    cols = 768 if qtype.block_size == 256 else 576
    raw = random_rows(qtype, 24, cols, seed=3)
    planes = to_planes(raw, qtype)
    assert torch.equal(dequantize_planes(planes), dequantize(raw, qtype))
    rows = torch.tensor([[5, 0], [23, 5]])
    assert torch.equal(dequantize_planes(planes.select(rows.reshape(-1))), dequantize(raw[rows.reshape(-1)], qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_planes_hold_about_the_files_bytes(qtype):
    raw = random_rows(qtype, 32, 1024)
    held = sum(t.numel() * t.element_size() for t in to_planes(raw, qtype).tensors().values())
    # 4-bit and 8-bit types as in the file; Q6_K's 6 bits and the 5-bit types widened to a byte.
    limit = {"Q6_K": 1.31, "Q5_0": 1.55, "Q5_K": 1.57}.get(qtype.name, 1.03)
    assert held <= limit * raw.numel()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_matmul_matches_dequantize_then_matmul(qtype, shape, dtype):
    k = shape[2] if qtype.block_size == 32 or shape[2] % 256 == 0 else 512
    assert check(qtype, shape[0], shape[1], k, dtype, "cuda") < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", [Q4_K, Q6_K], ids=lambda t: t.name)
def test_gguf_matmul_splits_k_for_a_narrow_decode_weight(qtype):  # 2048 x 8192: the down projection's shape
    assert check(qtype, 1, 2048, 8192, torch.bfloat16, "cuda") < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gguf_matmul_captures_in_a_cuda_graph():
    planes = to_planes(random_rows(Q4_K, 128, 512).cuda(), Q4_K)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    gguf_matmul(x, planes)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gguf_matmul(x, planes)
        rows = dequantize_planes(planes.select(torch.zeros(3, dtype=torch.long, device="cuda")))
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert relative_error(out, gguf_matmul_reference(x.double(), planes)) < TOLERANCE[torch.bfloat16]
    assert torch.equal(rows[0], dequantize_planes(planes)[0])


_INTERPRETED = """
import torch
from gguf_blocks import random_rows
from test_gguf_matmul_kernel import TYPES, check
from weir_server.kernels import gguf_matmul
from weir_server.kernels.gguf_matmul import TileConfig, gguf_dequantize
from weir_server.kernels.gguf_planes import dequantize_planes, to_planes
gguf_matmul.DEQUANTIZE_MAX_WEIGHTS = 40 * 768  # the (70, 200) product below takes the tiles, (70, 40) dequantizes
for qtype in TYPES:
    ragged = 576 if qtype.block_size == 32 else 768  # K not a multiple of the tile's K
    planes = to_planes(random_rows(qtype, 40, ragged), qtype)
    assert torch.equal(gguf_dequantize(planes, torch.float32), dequantize_planes(planes)), qtype.name
    for m, n, k in ((1, 40, 512), (17, 40, 768), (33, 24, ragged), (70, 40, ragged), (70, 200, ragged)):
        err = check(qtype, m, n, k, torch.float32, "cpu")
        assert err < 1e-5, (qtype.name, m, err)
    for tiles in (TileConfig(16, 16, 256, 3, 4, 1), TileConfig(16, 32, 64, 2, 4, 2)):  # split K, short tiles
        err = check(qtype, 2, 48, 1024, torch.float32, "cpu", tiles)
        assert err < 1e-5, (qtype.name, tiles, err)
print("ok")
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_gguf_matmul_kernel_logic_in_the_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED, os.path.dirname(__file__), timeout=300)


def test_a_weight_that_does_not_fit_k_is_refused():  # before anything needs Triton or a GPU
    planes = to_planes(random_rows(Q6_K, 4, 256), Q6_K)
    with pytest.raises(ValueError, match="does not fit"):
        gguf_matmul(torch.randn(1, 512), planes)
