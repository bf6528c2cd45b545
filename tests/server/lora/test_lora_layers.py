"""The LoRA layer's batched torch path (grouped by slot) against the per-token reference of the Triton kernels,
on a fused q/k/v layer whose slices carry different ranks, and the slot bookkeeping of a layer."""

from __future__ import annotations

import torch

from weir_server.kernels.lora import lora_ref
from weir_server.layers.linear import QKVParallelLinear, RowParallelLinear
from weir_server.layers.lora import LoRALinear, LoRAState, LoRATarget

MAX_RANK = 8


def _qkv_layer(state: LoRAState) -> LoRALinear:
    torch.manual_seed(0)
    base = QKVParallelLinear(32, 8, 4, 2)  # q 32 rows, k 16, v 16
    torch.nn.init.normal_(base.weight)
    target = LoRATarget("qkv_proj", ("q_proj", "k_proj", "v_proj"), 32, (32, 16, 16))
    return LoRALinear(base, target, 3, MAX_RANK, state)


def _random_slot(ranks: tuple[int | None, ...], sizes: tuple[int, ...]):
    return [None if r is None else (torch.randn(r, 32), torch.randn(n, r)) for r, n in zip(ranks, sizes, strict=True)]


def test_grouped_path_equals_the_per_token_reference_with_q_k_v_of_different_ranks():
    state = LoRAState(3)
    layer = _qkv_layer(state)
    slots_weights = {0: _random_slot((8, 2, 5), (32, 16, 16)), 2: _random_slot((None, 3, None), (32, 16, 16))}
    for slot, weights in slots_weights.items():
        layer.set_slot(slot, weights)
    x = torch.randn(7, 32)
    seq_slots, seq_lens = [0, -1, 2, 0], [2, 1, 3, 1]
    state.set_tokens(seq_slots, seq_lens, torch.device("cpu"))
    with torch.no_grad():
        got = layer(x)
        base = layer.base_layer(x)
    per_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_lens))
    expected = lora_ref(x, base.clone(), layer.lora_a, layer.lora_b, per_token, layer.row_offset)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Spelled out for one token of slot 0: each slice's own A and B, nothing crossing slices.
    q_a, q_b = slots_weights[0][0]
    k_a, k_b = slots_weights[0][1]
    torch.testing.assert_close(got[0, :32] - base[0, :32], q_b @ (q_a @ x[0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0, 32:48] - base[0, 32:48], k_b @ (k_a @ x[0]), atol=1e-4, rtol=1e-4)
    assert torch.equal(got[2], base[2])  # the base model's row


def test_a_slot_refilled_with_fewer_modules_forgets_the_old_ones():
    state = LoRAState(3)
    layer = _qkv_layer(state)
    layer.set_slot(1, _random_slot((8, 8, 8), (32, 16, 16)))
    layer.set_slot(1, _random_slot((None, None, 4), (32, 16, 16)))
    x = torch.randn(2, 32)
    state.set_tokens([1], [2], torch.device("cpu"))
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    assert torch.equal(delta[:, :48], torch.zeros(2, 48))
    assert layer.slot_ranks[1] == 4


def test_base_only_steps_skip_the_lora_math():
    state = LoRAState(3)
    base = RowParallelLinear(16, 8)
    layer = LoRALinear(base, LoRATarget("o_proj", ("o_proj",), 16, (8,)), 2, MAX_RANK, state)
    layer.set_slot(0, [(torch.randn(4, 16), torch.randn(8, 4))])
    state.set_tokens([-1, -1], [3, 1], torch.device("cpu"))
    assert not state.active
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
