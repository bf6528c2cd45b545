"""A GGUF's Q4_K rows in the C++ int4 layout and its Q6_K / Q5_0 rows in the int8 one (a bf16 model on a CPU), and
a Q4_K_M-style model's decode steps in one C++ call.

Q4_K's sub-block of 32 is w = d * sc * q - dmin * m; the int4 layout's w = (q - 8) * scale + zero takes
scale = d * sc and zero = 8 * scale - dmin * m, each rounded once to bf16 (unit roundoff 2^-8), as the dequantized
Q4_0/Q4_1 path rounds its scales and zeros: a weight moves by at most 2^-8 * (8 |scale| + |zero|) from the file's
float32 value.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_blocks import quantize_k
from paged_runner import PagedRunner
from test_q4_k_m_greedy import PROMPTS, q4_k_m_file, served  # noqa: F401 (fixtures)

from weir_server.config import ModelConfig
from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.kernels.gguf_dequant import Q4_K, Q5_0, Q6_K, GGMLType, dequantize
from weir_server.layers.gguf_weights import PACKED_OP_MAX_ROWS, Int4Rows, Int8BlockRows, int4_grid
from weir_server.models.loader import load_model

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the C++ CPU ops could not be built here")

ROWS, COLS = 64, 512
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def gguf_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Raw rows [ROWS, row_bytes] of a Q4_K, a Q6_K and a Q5_0 tensor, read back from a GGUF file."""
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((ROWS, COLS)) * 0.05).astype(np.float32)
    weights[:, :32] += 0.2  # a sub-block far from zero: a large Q4_K min
    path = Path(tmp_path_factory.mktemp("q4-k")) / "rows.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("q4_k", quantize_k(weights, Q4_K), raw_dtype=Q.Q4_K)
    writer.add_tensor("q6_k", quantize_k(weights, Q6_K), raw_dtype=Q.Q6_K)
    writer.add_tensor("q5_0", gguf.quants.quantize(weights, Q.Q5_0), raw_dtype=Q.Q5_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(np.array(t.data).reshape(ROWS, -1)) for t in reader.tensors}


def _within_two_level_error(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """As tests/server/kernels/test_cpu_ops.py: x's two int8 levels err by at most 1/(127 * 254) of their group's
    largest |x|, which with fp32 sums bounds how far the integer-dot ops may land from the exact product."""
    rows, k = x.shape
    expected = x.double() @ weight.double().t()
    group_max = x.double().abs().view(rows, -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(rows, k)
    bound = (group_max / (127 * 254)) @ weight.double().abs().t() + 1e-5 * expected.abs() + 1e-5
    return bool(((out.double() - expected).abs() <= bound).all())


def _x(rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, COLS, generator=gen) * torch.rand(rows, COLS, generator=gen) * 4


def test_q4_k_scales_and_zeros_in_bf16_stay_within_their_rounding_of_the_file(gguf_rows):
    raw = gguf_rows["q4_k"]
    q, scale, zero = int4_grid(raw, Q4_K)
    assert q.max() <= 15
    scale16, zero16 = scale.bfloat16().float(), zero.bfloat16().float()
    held = ((q.float() - 8).view(ROWS, -1, 32) * scale16.unsqueeze(-1) + zero16.unsqueeze(-1)).view(ROWS, COLS)
    bound = (2**-8 * (8 * scale.abs() + zero.abs())).repeat_interleave(32, dim=1) + 1e-7
    assert ((held - dequantize(raw, Q4_K)).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, 11, 40])
def test_q4_k_rows_take_the_int4_op_within_the_two_level_bound(gguf_rows, rows):
    raw = gguf_rows["q4_k"]
    form = Int4Rows(raw, Q4_K, torch.bfloat16)
    assert form.packed is not None and form.packed.shape[-1] == 160  # the C++ op's int4 blocks
    q, scale, zero = int4_grid(raw, Q4_K)
    weight = ((q.float() - 8).view(ROWS, -1, 32) * scale.bfloat16().float().unsqueeze(-1)).view(ROWS, COLS)
    weight += zero.bfloat16().float().repeat_interleave(32, dim=1)
    x = _x(rows, rows)
    out = form.matmul(x)
    assert out.dtype == torch.float32 and out.shape == (rows, ROWS)
    if rows > PACKED_OP_MAX_ROWS:  # tiles of the same weights, dequantized, for steps of many rows
        torch.testing.assert_close(out.double(), x.double() @ weight.double().t(), atol=1e-4, rtol=1e-5)
        return
    assert _within_two_level_error(out, x, weight)
    assert torch.equal(ops.int4_group_matmul(x, form.packed, portable=True), out)  # the scalar path's bits
    assert torch.equal(form.matmul(x[-1:])[0], out[-1])  # a row's result does not depend on its neighbours


def test_a_float32_model_keeps_torchs_int4_kernel_with_exact_scales(gguf_rows):
    form = Int4Rows(gguf_rows["q4_k"], Q4_K, torch.float32)
    assert form.packed is None
    x = _x(3, 0)
    expected = x.double() @ dequantize(gguf_rows["q4_k"], Q4_K).double().t()
    torch.testing.assert_close(form.matmul(x).double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("name", "qtype", "block_bytes"), [("q6_k", Q6_K, 352), ("q5_0", Q5_0, 224)])
@pytest.mark.parametrize("rows", [1, 11, 40])
def test_q6_k_and_q5_0_rows_take_the_int8_op_within_the_two_level_bound(gguf_rows, name, qtype, block_bytes, rows):
    raw = gguf_rows[name]
    form = Int8BlockRows(raw, qtype, torch.bfloat16)
    form.pack_for_cpu(torch.bfloat16)
    # Q6_K: the 8-bit layout with two scales per group of 32; Q5_0: the 5-bit layout, 0.875 bytes a weight
    assert form.packed is not None and form.packed.shape[-1] == block_bytes
    dequantized = ops.packed_dequantize(form.packed, torch.float32)
    assert torch.equal(dequantized, dequantize(raw, qtype))  # the file's weights, whichever layout
    form.drop_plain_rows()  # a projection's: the op takes every step
    assert form.qs is None
    x = _x(rows, rows)
    out = form.matmul(x)
    weight = dequantize(raw, qtype)  # the file's exact weights
    if rows > PACKED_OP_MAX_ROWS:  # tiles of them, dequantized, for steps of many rows
        torch.testing.assert_close(out.double(), x.double() @ weight.double().t(), atol=1e-4, rtol=1e-5)
        return
    assert _within_two_level_error(out, x, weight)
    assert torch.equal(ops.int8_packed_matmul(x, form.packed, portable=True), out)


def _forms(module: torch.nn.Module) -> list[tuple[str, GGMLType]]:
    return [(type(part).__name__, part.qtype) for part in module.parts]


def test_a_q4_k_m_model_decodes_in_one_call_with_its_modules_and_its_float32_runs_greedy_tokens(q4_k_m_file, served):  # noqa: F811
    path, folder, _ = q4_k_m_file
    loaded = load_model(
        ModelConfig(str(path), device="cpu", dtype="bfloat16", tokenizer=str(folder), keep_quantized=True)
    )
    model = loaded.model
    layer0, layer1 = model.model.layers
    assert _forms(layer0.self_attn.qkv_proj) == [("Int4Rows", Q4_K), ("Int8BlockRows", Q6_K)]  # q, k | v
    assert len(layer1.mlp.gate_up_proj.parts) == 2  # gate in Q4_K, up in Q5_K: silu(gate) * up after both
    assert model.prepare_cpu_decode()
    plan = model.model.cpu_decode
    assert plan.parts == [2, 1, 1, 1, 3, 1, 2, 1]  # per layer: qkv, o, gate_up, down
    one_call = PagedRunner(model, loaded.hf_config).greedy(PROMPTS, max_new_tokens=8)
    model.model.cpu_decode = None
    assert PagedRunner(model, loaded.hf_config).greedy(PROMPTS, max_new_tokens=8) == one_call
    # The float32 run of the same file, teacher-forced on these tokens, picks each of them up to near-ties (this
    # random model has one at 0.012 that bf16 flips).
    reference = PagedRunner(served.model, served.hf_config)
    for i, (prompt, tokens) in enumerate(zip(PROMPTS, one_call, strict=True)):
        logits = reference.step([(i, prompt + tokens[:-1])])[0][len(prompt) - 1 :]
        top2 = logits.topk(2, dim=-1).values
        for j, token in enumerate(tokens):
            assert token == int(logits[j].argmax()) or float(top2[j, 0] - top2[j, 1]) < 0.05


def test_the_default_bf16_load_keeps_the_files_blocks_beside_packed_bf16_copies(q4_k_m_file):  # noqa: F811
    """Without --quantization gguf a bf16 CPU load holds each projection twice: the file's parts (Q4_K as int4,
    Q6_K / Q5_K as int8, a fused q/k/v or gate/up part by part) for steps of a few rows, which decode in one C++
    call, and a packed bf16 copy for larger steps; the two agree to bf16's rounding."""
    from weir_server.layers.cpu_linear import PackedGateUpSilu, PackedLinear, pack_linear_layers
    from weir_server.layers.gguf_weights import INT4_MAX_ROWS

    path, folder, _ = q4_k_m_file
    model = load_model(ModelConfig(str(path), device="cpu", dtype="bfloat16", tokenizer=str(folder))).model
    if pack_linear_layers(model) == 0:
        pytest.skip("no oneDNN packing in this torch build")
    layer0, layer1 = model.model.layers
    assert type(layer0.self_attn.qkv_proj) is PackedLinear
    assert _forms(layer0.self_attn.qkv_proj) == [("Int4Rows", Q4_K), ("Int8BlockRows", Q6_K)]
    gate_up = layer1.mlp.gate_up_proj
    assert type(gate_up) is PackedGateUpSilu and len(gate_up.parts) == 2
    assert model.prepare_cpu_decode() and model.model.cpu_decode.parts == [2, 1, 1, 1, 3, 1, 2, 1]
    for module in (layer0.self_attn.qkv_proj, gate_up):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(INT4_MAX_ROWS + 1, module.in_features, generator=gen).bfloat16()
        batched = module(x).float()  # the bf16 copy
        for i in range(INT4_MAX_ROWS):
            one = module(x[i : i + 1]).float()[0]  # the file's blocks
            torch.testing.assert_close(one, batched[i], atol=0.02, rtol=2**-6)


def test_a_dequantized_q4_k_tensor_keeps_a_4_bit_copy_even_where_a_group_stops_short_of_16_levels(gguf_rows):
    from weir_server.layers.cpu_linear import lossless_int4

    raw = gguf_rows["q4_k"].clone()
    raw[0, 16:48] &= 0xEE  # sub-blocks 0 and 1 of row 0: even quants 0..14, no 15
    assert int4_grid(raw, Q4_K)[0][0, :64].max() < 15
    weight = dequantize(raw, Q4_K).bfloat16()  # what the default (dequantizing) load holds
    copy = lossless_int4(weight)
    assert copy is not None and copy.packed is not None
    x = _x(2, 0).bfloat16()
    torch.testing.assert_close(copy.matmul(x, None).float(), (x.float() @ weight.float().t()), atol=0.05, rtol=2**-7)
    assert lossless_int4(torch.randn(ROWS, COLS).bfloat16()) is None  # weights on no 4-bit grid


@pytest.mark.parametrize("name", ["q6_k", "q5_0"])
def test_int8_rows_apply_silu_and_mul_to_a_gate_up_pair_inside_the_op(gguf_rows, name):
    qtype = {"q6_k": Q6_K, "q5_0": Q5_0}[name]
    form = Int8BlockRows(gguf_rows[name], qtype, torch.bfloat16)  # rows 0..31 as gate, 32..63 as up
    form.pack_for_cpu(torch.bfloat16)
    x = _x(3, 1)
    gate, up = ops.int8_packed_matmul(x, form.packed).chunk(2, dim=-1)
    fused = ops.int8_packed_matmul(x, form.packed, silu_and_mul=True)
    torch.testing.assert_close(fused, torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)
    assert torch.equal(ops.int8_packed_matmul(x[1:2], form.packed, silu_and_mul=True)[0], fused[1])
