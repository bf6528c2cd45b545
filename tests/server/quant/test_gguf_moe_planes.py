"""The fused-experts kernel over GGUF experts kept as planes, against the batched torch reference on the same
experts dequantized: on the GPU (marked `gpu`) in bf16, and in Triton's interpreter on the CPU in float32 (the
routing, padding and per-expert row offsets into the stacked planes)."""

from __future__ import annotations

import os

import pytest
import torch
from gguf_blocks import random_rows

from weir_server.kernels.fused_moe import fused_experts_planes
from weir_server.kernels.gguf_dequant import Q4_0, Q4_K, Q6_K, Q8_0
from weir_server.kernels.gguf_planes import dequantize_planes, to_planes
from weir_server.kernels.testing import TRITON_INSTALLED, run_in_triton_interpreter
from weir_server.layers.fused_moe import fused_experts_torch, select_experts

CASES = [  # tokens, experts, hidden, intermediate, top_k, gate/up type, down type
    (1, 8, 256, 256, 2, Q4_K, Q6_K),
    (7, 4, 256, 512, 2, Q4_0, Q8_0),
    (70, 8, 512, 256, 2, Q8_0, Q4_K),
]


def random_case(case, dtype, device, seed):
    tokens, experts, hidden, inter, top_k, up_type, down_type = case
    g = torch.Generator().manual_seed(seed)
    w13 = to_planes(random_rows(up_type, experts * 2 * inter, hidden, seed=seed).to(device), up_type)
    w2 = to_planes(random_rows(down_type, experts * hidden, inter, seed=seed + 1).to(device), down_type)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    weights, ids = select_experts(torch.randn(tokens, experts, generator=g), top_k, renormalize=True)
    return x, w13, w2, weights.to(device), ids.to(device)


def check(case, dtype, device, seed=0) -> float:
    x, w13, w2, weights, ids = random_case(case, dtype, device, seed)
    experts = case[1]
    dense13 = dequantize_planes(w13).double().view(experts, -1, w13.cols)
    dense2 = dequantize_planes(w2).double().view(experts, -1, w2.cols)
    want = fused_experts_torch(x.double(), dense13, dense2, weights.double(), ids)
    got = fused_experts_planes(x, w13, w2, weights, ids, experts)
    assert got.shape == x.shape and got.dtype == dtype and torch.isfinite(got).all()
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[5].name}+{c[6].name}")
def test_fused_experts_over_planes_match_the_dequantized_reference(case):
    for seed in range(2):
        assert check(case, torch.bfloat16, "cuda", seed) < 1e-2


_INTERPRETED = """
import torch
from test_gguf_moe_planes import CASES, check
for case in CASES:
    err = check(case, torch.float32, "cpu")
    assert err < 1e-4, (case, err)
print("ok")
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_fused_experts_over_planes_logic_in_the_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED, os.path.dirname(__file__), timeout=300)
