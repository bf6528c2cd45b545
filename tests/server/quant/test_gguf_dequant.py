"""The plain-torch GGUF dequantizers agree bit for bit with the gguf package's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from gguf_blocks import random_rows

from weir_server.kernels.gguf_dequant import PACKED_TYPES, Q4_0, Q4_1, Q8_0, dequantize


@pytest.mark.parametrize("qtype", list(PACKED_TYPES.values()), ids=lambda t: t.name)
def test_random_blocks_dequantize_bit_exact(qtype):
    raw = random_rows(qtype, rows=3, cols=512, seed=qtype.id)
    expected = gguf_dequantize(raw.numpy(), GGMLQuantizationType(qtype.id))
    ours = dequantize(raw, qtype)
    assert ours.shape == (3, 512)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected)))


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0], ids=lambda t: t.name)
def test_quantized_weights_round_trip_like_gguf(qtype):
    weights = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    raw = gguf_quantize(weights, GGMLQuantizationType(qtype.id))
    expected = gguf_dequantize(raw, GGMLQuantizationType(qtype.id))
    assert torch.equal(dequantize(torch.from_numpy(raw), qtype), torch.from_numpy(expected))


def test_bytes_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="whole number of blocks"):
        dequantize(torch.zeros(2, 19, dtype=torch.uint8), Q4_0)
