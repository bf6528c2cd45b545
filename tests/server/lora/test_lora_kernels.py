"""The grouped (SGMV) LoRA kernels with split-K and per-slot ranks against `lora_ref`: on the CPU through Triton's
interpreter in float32 (a fresh process: the interpreter is chosen when the kernels are defined), and on a GPU in
float32 and bfloat16 at the 1B Llama's decode shapes."""

from __future__ import annotations

import os

import pytest
import torch

from weir_server.kernels import HAS_TRITON
from weir_server.kernels.lora import lora_ref
from weir_server.kernels.testing import TRITON_INSTALLED, run_in_triton_interpreter


def random_lora_case(
    num_tokens: int,
    k: int,
    slices: tuple[int, ...],
    rank: int,
    slot_ranks: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """x, out, lora_a, lora_b, slots (some -1), row_offset and the slots' ranks, with each slot's matrices zero past
    its rank (as `LoRALinear.set_slot` leaves them; a rank of 0 leaves the layer alone)."""
    gen = torch.Generator().manual_seed(seed)
    loras = len(slot_ranks)
    x = torch.randn(num_tokens, k, generator=gen)
    lora_a = torch.randn(loras, len(slices) * rank, k, generator=gen) * 0.1
    lora_b = torch.randn(loras, sum(slices), rank, generator=gen) * 0.1
    for slot, r in enumerate(slot_ranks):
        lora_a[slot].view(len(slices), rank, k)[:, r:] = 0
        lora_b[slot, :, r:] = 0
    slots = torch.randint(-1, loras, (num_tokens,), generator=gen)
    row_offset = torch.cat([torch.full((n,), i * rank, dtype=torch.int32) for i, n in enumerate(slices)])
    out = torch.randn(num_tokens, sum(slices), generator=gen)
    ranks = torch.tensor(slot_ranks, dtype=torch.int32)
    tensors = (x, out, lora_a, lora_b)
    return *(t.to(device, dtype) for t in tensors), slots.to(device), row_offset.to(device), ranks.to(device)


def update_error(got: torch.Tensor, want: torch.Tensor, out: torch.Tensor) -> float:
    """The relative error of the update the kernel added to `out` (not of the sum, which `out` would dominate)."""
    return float((got.double() - want).norm() / (want - out.double()).norm().clamp_min(1e-30))


# (tokens, K, slices, rank, each slot's rank, split_k): fused slices, empty and partial-rank slots, split-K that
# does and does not divide K, and the kernel's own choice (None).
CASES = [
    (1, 256, (96,), 8, (8, 8), None),
    (37, 256, (64, 32, 32), 16, (16, 0, 5, 16), 3),
    (70, 320, (32, 32), 16, (16, 7, 0), 4),
    (20, 192, (64,), 8, (0, 0), None),
]

_INTERPRETED = """
import torch
from test_lora_kernels import CASES, random_lora_case, update_error
from weir_server.kernels.lora import lora_apply_sgmv, lora_ref
for tokens, k, slices, rank, slot_ranks, split in CASES:
    x, out, a, b, slots, offsets, ranks = random_lora_case(tokens, k, slices, rank, slot_ranks)
    want = lora_ref(x.double(), out.double().clone(), a.double(), b.double(), slots, offsets)
    for used_ranks in (ranks, None):
        got = lora_apply_sgmv(x, out.clone(), a, b, slots, offsets, 32, slot_ranks=used_ranks, split_k=split)
        err = update_error(got, want, out)
        assert err < 1e-5, (tokens, slot_ranks, split, err)
        untouched = (slots < 0) | (ranks[slots.clamp(min=0)] == 0)
        assert torch.equal(got[untouched], out[untouched]), (tokens, slot_ranks, split)
print("ok")
"""


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_sgmv_kernels_split_k_and_slot_ranks_in_the_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED, os.path.dirname(__file__), timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA device and triton")
@pytest.mark.parametrize(
    ("dtype", "k", "slices", "loras"),
    [
        (torch.bfloat16, 2048, (2048, 512, 512), 1),  # qkv
        (torch.bfloat16, 2048, (2048, 512, 512), 16),
        (torch.bfloat16, 2048, (2048,), 16),  # o
        (torch.bfloat16, 8192, (2048,), 1),  # down
        (torch.float32, 2048, (2048, 512, 512), 16),
    ],
)
def test_sgmv_kernels_match_reference_at_decode_shapes(dtype, k, slices, loras):
    """The 1B Llama's qkv, o and down projections at 256 decode rows, rank 16, one slot per adapter in use."""
    from weir_server.kernels.lora import lora_apply_sgmv

    case = random_lora_case(256, k, slices, 16, (16,) * loras, dtype, "cuda", seed=loras)
    x, out, a, b, slots, offsets, ranks = case
    want = lora_ref(x.double(), out.double().clone(), a.double(), b.double(), slots, offsets)
    got = lora_apply_sgmv(x, out.clone(), a, b, slots, offsets, 64, slot_ranks=ranks)
    assert update_error(got, want, out) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(got[slots < 0], out[slots < 0])


_INTERPRETED_LAYER = """
import torch
from test_lora_kernels import layer_case
from weir_server.kernels.lora import lora_ref
layer, x, slots = layer_case()
layer.state.slots = slots  # as a CUDA step sets it: the layer takes the grouped kernels
with torch.no_grad():
    got, base = layer(x), layer.base_layer(x)
want = lora_ref(x.double(), base.double(), layer.lora_a.double(), layer.lora_b.double(), slots, layer.row_offset)
assert float((got.double() - want).norm() / (want - base.double()).norm()) < 1e-5
# An eager CUDA step's slots and segments, grouped on the host and packed into one array: the same bits.
from weir_server.kernels.lora import host_segments, split_segments
counts = torch.unique_consecutive(slots, return_counts=True)
seq_slots = torch.unique_consecutive(slots).tolist()
packed = torch.from_numpy(host_segments(seq_slots, counts[1].tolist(), 3, 16))
layer.state.slots, layer.state.segments = split_segments(packed, len(slots), 3)
with torch.no_grad():
    assert torch.equal(layer(x), got)
for slot in range(3):
    layer.set_slot(slot, None)
layer.state.segments = None
with torch.no_grad():
    assert torch.equal(layer(x), base)  # no adapter here: the layer adds nothing (and launches nothing)
print("ok")
"""


def layer_case():
    """A fused q/k/v LoRA layer whose three slots hold adapters of rank 8 (q, k, v), 3 (v only) and none, and a
    step's tokens over them and the base model."""
    from weir_server.layers.linear import QKVParallelLinear
    from weir_server.layers.lora import LoRALinear, LoRAState, LoRATarget

    torch.manual_seed(0)
    base = QKVParallelLinear(64, 16, 4, 2)  # q 64 rows, k 32, v 32
    torch.nn.init.normal_(base.weight)
    target = LoRATarget("qkv_proj", ("q_proj", "k_proj", "v_proj"), 64, (64, 32, 32))
    layer = LoRALinear(base, target, 3, 8, LoRAState(3))
    layer.set_slot(0, [(torch.randn(8, 64), torch.randn(n, 8)) for n in (64, 32, 32)])
    layer.set_slot(1, [None, None, (torch.randn(3, 64), torch.randn(32, 3))])
    slots = torch.tensor([0, 1, -1, 2, 0, 1, 1, 2, -1, 0])
    return layer, torch.randn(len(slots), 64), slots


@pytest.mark.parametrize("num_loras", [1, 4, 16])
def test_host_segments_equal_the_device_grouping(num_loras):
    from weir_server.kernels.lora import SGMV_BLOCK_T, host_segments, lora_segments, split_segments

    generator = torch.Generator().manual_seed(num_loras)
    seq_slots = torch.randint(-1, num_loras, (23,), generator=generator).tolist()
    seq_lens = torch.randint(1, 40, (23,), generator=generator).tolist()
    packed = torch.from_numpy(host_segments(seq_slots, seq_lens, num_loras, SGMV_BLOCK_T))
    slots, (order, counts, block_end, token_start) = split_segments(packed, sum(seq_lens), num_loras)
    assert all(view.data_ptr() % 16 == 0 for view in (slots, order, counts, block_end, token_start))
    expected_slots = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_lens))
    assert torch.equal(slots.long(), expected_slots)
    want = lora_segments(expected_slots.to(torch.int32), num_loras, SGMV_BLOCK_T)
    for got, ref in zip((counts, block_end, token_start), want[1:], strict=True):
        assert torch.equal(got, ref)
    # Tokens of a slot may come in another order; each slot's stretch holds the same tokens.
    for start, count in zip(token_start.tolist(), counts.tolist(), strict=True):
        assert sorted(order[start : start + count].tolist()) == sorted(want[0][start : start + count].tolist())
        assert order[start : start + count].tolist() == sorted(order[start : start + count].tolist())


def test_lora_ranks_follow_the_slots_fills():
    layer, _, _ = layer_case()
    assert layer.lora_ranks.tolist() == layer.slot_ranks == [8, 3, 0]
    layer.set_slot(0, None)
    assert layer.lora_ranks.tolist() == [0, 3, 0]


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_layer_through_the_grouped_kernels_in_the_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED_LAYER, os.path.dirname(__file__), timeout=300)
