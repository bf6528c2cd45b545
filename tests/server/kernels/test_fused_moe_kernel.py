"""The Triton fused-experts kernel against the batched torch reference: on the GPU (marked `gpu`) in bf16 and
fp16 by relative error of the norm, and on the CPU through Triton's interpreter in float32 (the interpreter's
bf16 dot is wrong in Triton 3.9, so it checks the indexing, padding and routing logic, not the precision)."""

from __future__ import annotations

import os

import pytest
import torch

from weir_server.kernels.fused_moe import fused_experts, moe_align_block_size
from weir_server.kernels.testing import TRITON_INSTALLED, run_in_triton_interpreter
from weir_server.layers.fused_moe import fused_experts_torch, select_experts

CASES = [  # tokens, experts, hidden, intermediate, top_k
    (1, 8, 128, 64, 2),
    (7, 8, 256, 96, 2),
    (33, 4, 128, 128, 1),
    (200, 8, 512, 256, 2),
    (1024, 16, 256, 128, 4),
]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def random_case(case, dtype, device, seed):
    tokens, experts, hidden, inter, top_k = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=g), top_k, renormalize=True)
    return [t.to(device=device, dtype=dtype) for t in (x, w13, w2)] + [weights.to(device), ids.to(device)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output (unwritten rows?)"
    return ((got.double() - want).norm() / want.norm()).item()


def test_align_pads_each_expert_run_to_whole_blocks():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    sorted_ids, expert_ids, total = moe_align_block_size(ids, block_m=4, num_experts=3)
    pad = ids.numel()
    assert total.tolist() == [12]  # experts 0, 1, 2 hold 2, 1, 3 pairs: one block each
    assert sorted_ids[:12].tolist() == [1, 4, pad, pad, 3, pad, pad, pad, 0, 2, 5, pad]
    assert expert_ids[:3].tolist() == [0, 1, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_fused_experts_kernel_matches_reference(case, dtype):
    for seed in range(2):  # fresh inputs each time
        x, w13, w2, weights, ids = random_case(case, dtype, "cuda", seed)
        torch.full((x.shape[0] * ids.shape[1] * 2, max(w13.shape[1], x.shape[1])), float("nan"), device="cuda")
        got = fused_experts(x, w13, w2, weights, ids)
        want = fused_experts_torch(x.double(), w13.double(), w2.double(), weights.double(), ids)
        assert relative_error(got, want) < TOLERANCE[dtype]


_INTERPRETED = """
import torch
from test_fused_moe_kernel import CASES, random_case, relative_error
from weir_server.kernels.fused_moe import fused_experts
from weir_server.layers.fused_moe import fused_experts_torch
for case in CASES[:4]:
    x, w13, w2, weights, ids = random_case(case, torch.float32, "cpu", 0)
    want = fused_experts_torch(x.double(), w13.double(), w2.double(), weights.double(), ids)
    err = relative_error(fused_experts(x, w13, w2, weights, ids), want)
    assert err < 1e-4, (case, err)
print("ok")
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_fused_experts_kernel_logic_in_the_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED, os.path.dirname(__file__), timeout=120)
