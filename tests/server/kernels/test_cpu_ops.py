"""The C++ CPU decode ops (weir_server/kernels/cpu) against the torch paths they replace, which stay the reference.

The ops are built for this machine on first use (about 30 s once, then cached); where they cannot be built the
layers keep their torch paths and these tests are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.attention import PagedAttention, _decode_attention, write_kv_cache
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.norm import RMSNorm
from weir_server.layers.rotary import RotaryEmbedding

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the C++ CPU ops could not be built here")

# (atol, rtol) against the torch path: bf16 rounds at other points (once where torch rounds twice), so one bf16
# step of the value (rtol 2^-7) or, near zero, of the inputs' scale; fp32 differs only in the order of sums.
TOLERANCE = {torch.bfloat16: {"atol": 3e-2, "rtol": 2**-7}, torch.float32: {"atol": 2e-5, "rtol": 1e-5}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (3, 576), (40, 576), (5, 100), (130, 4096)])
def test_rms_norm_and_the_fused_residual_add_match_torch(dtype: torch.dtype, rows: int, hidden: int) -> None:
    """Hidden sizes a multiple of 16 and not (100); one thread's rows and several threads' (130 x 4096)."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    want = F.rms_norm(x, (hidden,), weight, 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), want, **TOLERANCE[dtype])
    summed = x + residual
    expected = F.rms_norm(summed, (hidden,), weight, 1e-5)
    x_in, residual_in = x.clone(), residual.clone()
    normed, new_residual = ops.fused_add_rms_norm(x_in, residual_in, weight, 1e-5)
    assert normed.data_ptr() == x_in.data_ptr() and new_residual.data_ptr() == residual_in.data_ptr()  # in place
    torch.testing.assert_close(new_residual, summed, atol=0, rtol=0)  # the sum rounds once, like torch's add
    torch.testing.assert_close(normed, expected, **TOLERANCE[dtype])


def test_the_norm_layer_takes_the_op_on_cpu_and_keeps_torch_semantics() -> None:
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x, residual = torch.randn(4, 64), torch.randn(4, 64)
    expected = F.rms_norm(x + residual, (64,), norm.weight, 1e-6)
    normed, summed = norm(x.clone(), residual.clone())
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, expected)
    strided = torch.randn(4, 128)[:, :64]  # not contiguous: the torch path
    torch.testing.assert_close(norm(strided), F.rms_norm(strided, (64,), norm.weight, 1e-6))


def _decode_batch(
    context_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    query_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step of query_lens[b] tokens per sequence (default one: a decode), the last of its context_lens[b]: a fused
    q/k/v output (q, k, v are views of its rows, as in the models), a cache with every earlier token in shuffled
    blocks, the tokens' positions and slots, and the step's metadata."""
    query_lens = query_lens or [1] * len(context_lens)
    gen = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    max_blocks = max(-(-n // block_size) for n in context_lens)
    num_blocks = batch * max_blocks + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    positions = torch.cat([torch.arange(c - q, c) for q, c in zip(query_lens, context_lens, strict=True)])
    seq_of = torch.repeat_interleave(torch.arange(batch), torch.tensor(query_lens))
    slots = tables[seq_of, positions // block_size].long() * block_size + positions % block_size
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    attn = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        block_size=block_size,
        query_lens_cpu=list(query_lens),
        context_lens_cpu=list(context_lens),
    )
    return qkv, cache, positions, slots, attn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("context_lens", "heads", "kv_heads", "head_dim", "rotary_dim", "window", "softcap"),
    [
        ([37], 9, 3, 64, 64, None, None),  # SmolLM2's layout, one stream
        ([5, 130, 64, 1], 8, 2, 32, 32, None, None),  # a block boundary, a one-token context
        ([90, 17, 200], 4, 4, 16, 8, None, None),  # multi-head, partial rotary
        ([300, 40], 8, 1, 32, 32, 64, None),  # multi-query, a sliding window shorter than one context
        ([50, 75], 6, 2, 16, 16, None, 30.0),  # Gemma 2's soft-capped scores
        ([20, 41], 14, 2, 64, 64, None, None),  # 7 query heads a KV head: the values' sums in two register groups
        ([33, 70], 16, 2, 128, 64, None, None),  # head_dim 128, 8 query heads a KV head (four groups of two)
    ],
)
def test_decode_attention_matches_the_torch_rotary_cache_write_and_attention(
    dtype: torch.dtype,
    context_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    window: int | None,
    softcap: float | None,
) -> None:
    block_size = 16
    qkv, cache, positions, slots, attn = _decode_batch(
        context_lens, heads, kv_heads, head_dim, block_size, dtype, seed=len(context_lens) + head_dim
    )
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    rope = RotaryEmbedding(head_dim, inv_freq).for_step(positions, dtype)
    scale = head_dim**-0.5

    reference_cache = cache.clone()
    rq, rk = rope.rotate(q, k)
    write_kv_cache(rk, v, reference_cache, slots)
    expected = _decode_attention(rq, reference_cache[0], reference_cache[1], attn, scale, window, softcap)

    layer = PagedAttention(heads, kv_heads, head_dim, scale, sliding_window=window, logit_softcap=softcap)
    out = layer(q, k, v, cache, attn, rope)  # the layer picks the C++ op for a decode-only CPU step

    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(cache, reference_cache, **TOLERANCE[dtype])  # the same K/V, same slots
    untouched = torch.ones(cache.shape[1] * block_size, dtype=torch.bool)
    untouched[slots] = False
    flat = cache.view(2, -1, kv_heads, head_dim)
    torch.testing.assert_close(flat[:, untouched], reference_cache.view(2, -1, kv_heads, head_dim)[:, untouched])


def test_decode_attention_gives_each_sequence_the_same_bits_alone_or_batched() -> None:
    """A sequence's output does not depend on what shares its step (the torch path's padded gathers do)."""
    qkv, cache, positions, slots, attn = _decode_batch([70, 9, 33], 8, 2, 32, 16, torch.bfloat16, seed=3)
    q, k, v = qkv.split([256, 64, 64], dim=-1)
    q, k, v = q.view(-1, 8, 32), k.view(-1, 2, 32), v.view(-1, 2, 32)
    rope = RotaryEmbedding(32, 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))).for_step(
        positions, torch.bfloat16
    )
    cos, sin = rope.flat_cos_sin()
    batched = ops.decode_attention(q, k, v, cos, sin, *cache.clone(), attn.block_tables, attn.context_lens,
                                   attn.query_start_loc, slots, 0.2, 0, 0.0)  # fmt: skip
    for i in range(3):
        alone = ops.decode_attention(
            q[i : i + 1], k[i : i + 1], v[i : i + 1], cos[i : i + 1], sin[i : i + 1], *cache.clone(),
            attn.block_tables[i : i + 1], attn.context_lens[i : i + 1], attn.query_start_loc[:2], slots[i : i + 1],
            0.2, 0, 0.0,
        )  # fmt: skip
        assert torch.equal(alone[0], batched[i])


def test_bad_arguments_raise_instead_of_reading_out_of_bounds() -> None:
    qkv, cache, positions, slots, attn = _decode_batch([10], 4, 2, 16, 16, torch.float32, seed=0)
    q = qkv[:, :64].view(1, 4, 16)
    k = qkv[:, 64:96].view(1, 2, 16)
    v = qkv[:, 96:].view(1, 2, 16)
    cos = sin = torch.zeros(1, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.decode_attention(q, k, v, cos.bfloat16(), sin.bfloat16(), *cache, attn.block_tables, attn.context_lens,
                             attn.query_start_loc, slots, 0.25, 0, 0.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="int32"):
        ops.decode_attention(q, k, v, cos, sin, *cache, attn.block_tables.long(), attn.context_lens,
                             attn.query_start_loc, slots, 0.25, 0, 0.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="disagree"):  # more query tokens than the context holds
        ops.decode_attention(q, k, v, cos, sin, *cache, attn.block_tables, torch.zeros(1, dtype=torch.int32),
                             attn.query_start_loc, slots, 0.25, 0, 0.0)  # fmt: skip


@pytest.mark.parametrize(("group", "with_offsets"), [(32, False), (16, False), (32, True)])  # Q8_0, Q6_K, Q5_K
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_group_matmul_equals_the_float32_dequantized_product(
    group: int, with_offsets: bool, rows: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(group + rows)
    n, k = 300, 256
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // group, generator=gen) / 64
    offsets = torch.rand(n, k // group, generator=gen) / 8 if with_offsets else None
    x = torch.randn(rows, k, generator=gen).to(dtype)
    weight = q.float().view(n, -1, group) * scales.unsqueeze(-1)
    if offsets is not None:
        weight = weight - offsets.unsqueeze(-1)
    expected = x.double() @ weight.view(n, k).double().t()
    out = ops.int8_group_matmul(x, q, scales, offsets)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)  # fp32 sums of exact products
    for i in range(rows):  # a row's logits do not depend on the rows beside it (a verify row = its decode)
        assert torch.equal(ops.int8_group_matmul(x[i : i + 1], q, scales, offsets)[0], out[i])


def _within_two_level_error(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, expected: torch.Tensor) -> bool:
    """x's two int8 levels err by at most 1/(127 * 254) of their group's largest |x| (under bf16's own rounding
    of x); with fp32 sums that bounds how far the integer-dot ops may land from the exact product."""
    rows, k = x.shape
    group_max = x.double().abs().view(rows, -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(rows, k)
    bound = (group_max / (127 * 254)) @ weight.double().abs().t() + 1e-5 * expected.abs() + 1e-5
    return bool(((out.double() - expected).abs() <= bound).all())


def _q4_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q uint8 [n, k] in 0..15 and bf16 scales, zeros [n, k / 32] (W = (q - 8) * scale + zero, as Q4_1 gives)."""
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // 32, generator=gen) / 32 + 1e-3).bfloat16()
    zeros = (torch.randn(n, k // 32, generator=gen) / 16).bfloat16()
    return q, scales, zeros


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), [(64, 96), (200, 576)])
def test_int4_group_matmul_equals_the_dequantized_product(rows: int, dtype: torch.dtype, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(rows + n)
    q, scales, zeros = _q4_weight(n, k, gen)
    weight = ((q.float() - 8).view(n, -1, 32) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).view(n, k)
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen) * 4).to(dtype)
    x[0, :32] = 0  # a group of zeros
    expected = x.double() @ weight.double().t()
    packed = ops.int4_pack(q, scales, zeros)
    out = ops.int4_group_matmul(x, packed)
    assert out.dtype == dtype and out.shape == (rows, n)
    # In fp32 the levels' error bounds the difference; in bf16 the output's rounding dominates.
    if dtype == torch.float32:
        assert _within_two_level_error(out, x, weight, expected)
    else:
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    assert torch.equal(ops.int4_group_matmul(x, packed, portable=True), out)  # the scalar path: the same bits
    for i in range(rows):  # a row's output does not depend on the rows beside it (a verify row = its decode)
        assert torch.equal(ops.int4_group_matmul(x[i : i + 1], packed)[0], out[i])


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("with_offsets", [False, True])  # Q8_0, Q5_K
def test_int8_packed_matmul_equals_the_dequantized_product(rows: int, with_offsets: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    n, k = 96, 192
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    q[0, :32] = -128  # the extreme that |q| and q + 128 must both get right
    scales = torch.rand(n, k // 32, generator=gen) / 64
    offsets = torch.rand(n, k // 32, generator=gen) / 8 if with_offsets else None
    weight = (q.float().view(n, -1, 32) * scales.unsqueeze(-1)).view(n, k)
    if offsets is not None:
        weight = weight - offsets.repeat_interleave(32, dim=1)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen) * 4
    packed = ops.int8_pack(q, scales, offsets)
    out = ops.int8_packed_matmul(x, packed)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert _within_two_level_error(out, x, weight, x.double() @ weight.double().t())
    assert torch.equal(ops.int8_packed_matmul(x, packed, portable=True), out)
    for i in range(rows):
        assert torch.equal(ops.int8_packed_matmul(x[i : i + 1], packed)[0], out[i])


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_int5_packed_matmul_equals_the_dequantized_product_and_its_layout_holds_the_exact_weights(rows: int) -> None:
    """The 5-bit layout (GGUF's Q5_0, Q5_1, Q5_K): u in 0..31, a scale and an offset per group of 32, every fifth
    bit in its own plane; the same integer dot as the 8-bit layout, so the same bounds and the same bit rules."""
    gen = torch.Generator().manual_seed(rows)
    n, k = 96, 192
    u = torch.randint(0, 32, (n, k), generator=gen, dtype=torch.uint8)
    u[0, :32], u[1, :32] = 31, 0  # every fifth bit set, and none
    scales = torch.rand(n, k // 32, generator=gen) / 64
    offsets = torch.rand(n, k // 32, generator=gen) / 8
    weight = (u.double().view(n, -1, 32) * scales.double().unsqueeze(-1) - offsets.double().unsqueeze(-1)).view(n, k)
    packed = ops.int5_pack(u, scales, offsets)
    assert packed.shape == (n // 8, k // 32, 224)  # 0.875 bytes a weight
    assert torch.equal(ops.packed_dequantize(packed, torch.float32), weight.float())  # one rounding, as the fma
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen) * 4
    out = ops.int8_packed_matmul(x, packed)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert _within_two_level_error(out, x, weight.float(), x.double() @ weight.t())
    assert torch.equal(ops.int8_packed_matmul(x, packed, portable=True), out)
    for i in range(rows):
        assert torch.equal(ops.int8_packed_matmul(x[i : i + 1], packed)[0], out[i])
    with pytest.raises(RuntimeError, match="0..31"):
        ops.int5_pack(u | 32, scales, offsets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_group_matmul_applies_silu_and_mul_to_a_gate_up_pair(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    q, scales, zeros = _q4_weight(128, 96, gen)  # [gate; up], 64 rows each
    packed = ops.int4_pack(q, scales, zeros)
    x = torch.randn(3, 96, generator=gen).to(dtype)
    gate, up = ops.int4_group_matmul(x, packed).float().chunk(2, dim=-1)
    fused = ops.int4_group_matmul(x, packed, silu_and_mul=True)
    assert fused.dtype == dtype and fused.shape == (3, 64)
    # fp32 inside and one rounding, where the reference rounds gate and up first
    torch.testing.assert_close(fused.float(), F.silu(gate) * up, **TOLERANCE[dtype])
    assert torch.equal(ops.int4_group_matmul(x[1:2], packed, silu_and_mul=True)[0], fused[1])


def test_int4_pack_refuses_shapes_it_cannot_lay_out() -> None:
    gen = torch.Generator().manual_seed(0)
    q, scales, zeros = _q4_weight(60, 64, gen)  # 60 rows: not a multiple of 8
    with pytest.raises(RuntimeError, match="N % 8"):
        ops.int4_pack(q, scales, zeros)
    q, scales, zeros = _q4_weight(64, 64, gen)
    with pytest.raises(RuntimeError, match="disagree on K"):
        ops.int4_group_matmul(torch.randn(1, 96), ops.int4_pack(q, scales, zeros))


def test_gguf_int8_rows_take_the_op_for_a_decode_row_and_the_tiles_for_more() -> None:
    from weir_server.kernels.gguf_dequant import Q8_0, dequantize
    from weir_server.layers.gguf_weights import INT8_OP_MAX_ROWS, Int8BlockRows

    gen = torch.Generator().manual_seed(0)
    n, k = 96, 128
    blocks = torch.randint(0, 256, (n, k // 32, 34), generator=gen, dtype=torch.uint8)
    blocks[..., :2] = torch.tensor([0x00, 0x20], dtype=torch.uint8)  # every block's fp16 scale = 2**-7
    raw = blocks.reshape(n, -1)
    rows = Int8BlockRows(raw, Q8_0, torch.float32)
    weight = dequantize(raw, Q8_0).float()
    for batch in (1, INT8_OP_MAX_ROWS + 3):
        x = torch.randn(batch, k, generator=gen)
        torch.testing.assert_close(rows.matmul(x), x @ weight.t(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 6])
def test_short_query_chunks_match_the_torch_path_and_each_token_equals_its_decode(
    dtype: torch.dtype, window: int | None
) -> None:
    """A speculative verify step (a few query tokens per sequence, decodes beside them): the same outputs as the
    torch path, and each token's row the same bits as decoding that token alone after the ones before it."""
    from weir_server.layers.attention import CPU_OP_MAX_QUERY_LEN, paged_attention_torch

    query_lens, context_lens = [4, 1, CPU_OP_MAX_QUERY_LEN], [40, 23, 17]
    heads, kv_heads, head_dim = 6, 2, 32
    qkv, cache, positions, slots, attn = _decode_batch(
        context_lens, heads, kv_heads, head_dim, 16, dtype, seed=7, query_lens=query_lens
    )
    tables, total = attn.block_tables, len(positions)
    seq_of = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    rope = RotaryEmbedding(head_dim, 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
    step_rope = rope.for_step(positions, dtype)

    reference_cache = cache.clone()
    rq, rk = step_rope.rotate(q, k)
    write_kv_cache(rk, v, reference_cache, slots)
    expected = paged_attention_torch(rq, reference_cache[0], reference_cache[1], attn, head_dim**-0.5, window)
    layer = PagedAttention(heads, kv_heads, head_dim, sliding_window=window)
    chunked_cache = cache.clone()
    out = layer(q, k, v, chunked_cache, attn, step_rope)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(chunked_cache, reference_cache, **TOLERANCE[dtype])

    cos, sin = step_rope.flat_cos_sin()
    one = torch.tensor([0, 1], dtype=torch.int32)
    decoded_cache = cache.clone()
    for t in range(total):  # token by token, in order, as plain decoding would run them
        b = int(seq_of[t])
        alone = ops.decode_attention(
            q[t : t + 1], k[t : t + 1], v[t : t + 1], cos[t : t + 1], sin[t : t + 1], *decoded_cache,
            tables[b : b + 1], (positions[t : t + 1] + 1).to(torch.int32), one, slots[t : t + 1],
            head_dim**-0.5, window or 0, 0.0,
        )  # fmt: skip
        assert torch.equal(alone[0], out[t])
