"""Random GGUF blocks for the quantization tests: valid bytes of each packed type, no Triton or GPU needed."""

from __future__ import annotations

import numpy as np
import torch

from weir_server.kernels.gguf_dequant import GGMLType, row_bytes

# Byte offsets of each type's float16 fields (d, dmin or m), kept finite and small in random blocks.
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_rows(qtype: GGMLType, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Raw bytes [rows, row_bytes] of random blocks whose scales are ordinary float16 numbers (~1e-2)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // qtype.block_size, qtype.type_size), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype.name]:
        scales = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, row_bytes(qtype, cols)))
