"""Random GGUF blocks for the quantization tests: valid bytes of each packed type, no Triton or GPU needed."""

from __future__ import annotations

import numpy as np
import torch

from weir_server.kernels.gguf_dequant import GGMLType, row_bytes

# Byte offsets of each type's float16 fields (d, dmin or m), kept finite and small in random blocks.
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_rows(qtype: GGMLType, rows: int, cols: int, seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    """Raw bytes [rows, row_bytes] of random blocks whose scales are ordinary float16 numbers (~`scale`)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // qtype.block_size, qtype.type_size), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype.name]:
        scales = (rng.standard_normal(raw.shape[0]) * scale).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, row_bytes(qtype, cols)))


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return _f16(values).reshape(-1, 1).view(np.uint8)


def _k_scale_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] -> GGML's 12 packed bytes [n, 12]."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, :4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _quantize_k_asymmetric(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K: per 32-weight sub-block w ~ d*sc*q - dmin*m; returns (d, dmin bytes, scale bytes, q [n, 8, 32])."""
    sub = blocks.reshape(-1, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scales = (sub.max(-1) - low) / nmax
    mins = -low
    d = _f16(scales.max(-1, keepdims=True) / 63 + 1e-12)
    dmin = _f16(mins.max(-1, keepdims=True) / 63 + 1e-12)
    sc = np.clip(np.rint(scales / d.astype(np.float32)), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / dmin.astype(np.float32)), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[..., None]
    offset = (dmin.astype(np.float32) * mn)[..., None]
    q = np.clip(np.rint((sub + offset) / step), 0, nmax).astype(np.uint8)
    return _f16_bytes(d), _f16_bytes(dmin), _k_scale_bytes(sc, mn), q


def quantize_k(weights: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """Float weights [rows, cols] (cols a multiple of 256) -> Q4_K, Q5_K or Q6_K rows, packed as llama.cpp
    lays them out (the gguf package can only read these types)."""
    rows = weights.shape[0]
    blocks = weights.astype(np.float32).reshape(-1, 256)
    if qtype.name in ("Q4_K", "Q5_K"):
        d, dmin, scales, q = _quantize_k_asymmetric(blocks, 15 if qtype.name == "Q4_K" else 31)
        pairs = q.reshape(-1, 4, 2, 32)
        qs = (pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)
        parts = [d, dmin, scales]
        if qtype.name == "Q5_K":
            bits = (q >> 4) & 1  # [n, 8, 32]: bit j of qh[l] is sub-block j's fifth bit
            parts.append((bits << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(1).astype(np.uint8))
        parts.append(qs.reshape(-1, 128))
    else:  # Q6_K: 16 sub-blocks of 16, symmetric, int8 scales
        sub = blocks.reshape(-1, 16, 16)
        scales = np.abs(sub).max(-1) / 31 + 1e-12
        d = _f16(scales.max(-1, keepdims=True) / 127)
        sc = np.clip(np.rint(scales / d.astype(np.float32)), 1, 127).astype(np.int8)
        step = (d.astype(np.float32) * sc)[..., None]
        q = (
            (np.clip(np.rint(sub / step), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
        )  # [n, half, quarter, 32]
        ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # quarters 0,1 low nibbles; 2,3 high
        qh = ((q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)).sum(2).astype(np.uint8)
        parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)]
    raw = np.concatenate(parts, axis=1)
    assert raw.shape[1] == qtype.type_size
    return raw.reshape(rows, -1)


def write_random_q4_k_m(
    path, *, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int, context: int, rope_base: float
):
    """A random Llama GGUF in Q4_K_M's mix: Q4_K, with v and down in Q6_K in every other layer and a Q6_K embedding
    (tied head). For the benchmarks' memory and speed checks; the tests write their own small files."""
    import gguf

    from weir_server.kernels.gguf_dequant import Q4_K, Q6_K

    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (writer.add_context_length, context),
        (writer.add_block_count, layers),
        (writer.add_feed_forward_length, ffn),
        (writer.add_embedding_length, hidden),
        (writer.add_rope_dimension_count, hidden // heads),
        (writer.add_rope_freq_base, rope_base),
        (writer.add_head_count, heads),
        (writer.add_head_count_kv, kv_heads),
        (writer.add_layer_norm_rms_eps, 1e-5),
        (writer.add_vocab_size, vocab),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
    ):
        add(value)
    ones = np.ones(hidden, dtype=np.float32)
    embedding = random_rows(Q6_K, vocab, hidden, 1, 1e-3).numpy()
    writer.add_tensor("token_embd.weight", embedding, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    writer.add_tensor("output_norm.weight", ones)
    head_dim = hidden // heads
    for layer in range(layers):
        big = Q6_K if layer % 2 == 0 else Q4_K
        for name, qtype, (n, k) in (
            ("attn_q", Q4_K, (hidden, hidden)),
            ("attn_k", Q4_K, (kv_heads * head_dim, hidden)),
            ("attn_v", big, (kv_heads * head_dim, hidden)),
            ("attn_output", Q4_K, (hidden, hidden)),
            ("ffn_gate", Q4_K, (ffn, hidden)),
            ("ffn_up", Q4_K, (ffn, hidden)),
            ("ffn_down", big, (hidden, ffn)),
        ):
            raw = random_rows(qtype, n, k, seed=layer * 10 + len(name), scale=2e-4).numpy()
            writer.add_tensor(f"blk.{layer}.{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType(qtype.id))
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
