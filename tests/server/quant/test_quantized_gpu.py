"""Quantized paths on the GPU (marked `gpu`, skipped without CUDA): FP8 matmuls through torch._scaled_mm against
their float32 reference, `--quantization fp8` and 4-bit checkpoints end to end (the FP8 KV cache's test is in
tests/server/gpu/test_fp8_kv_cache.py, beside the tiny model it shares)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_checks import PROMPTS, hf_logits
from paged_runner import PagedRunner, save_tiny_tokenizer
from quantized_checkpoints import tiny_llama_config, write_int4_checkpoint

from weir_server.config import ModelConfig
from weir_server.kernels.fp8_matmul import fp8_matmul, fp8_matmul_reference, quantize_weight_per_channel
from weir_server.layers.fp8_linear import Fp8Linear
from weir_server.layers.int4_linear import Int4Linear, PackedInt4
from weir_server.models.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got64, want64 = got.double(), want.double()
    return ((got64 - want64).norm() / want64.norm().clamp_min(1e-30)).item()


def fp8_matmuls() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("m", [1, 16, 100, 256])
def test_scaled_mm_matches_the_float32_reference(m: int) -> None:
    if not fp8_matmuls():
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    gen = torch.Generator().manual_seed(m)
    weight = (torch.randn(2048, 1024, generator=gen) * 0.05).cuda()
    w8, scale = quantize_weight_per_channel(weight)
    x = torch.randn(m, 1024, generator=gen).cuda().bfloat16()
    out = fp8_matmul(x, w8, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 2048) and torch.isfinite(out).all()
    assert relative_error(out, fp8_matmul_reference(x.float(), w8, scale)) < 1e-2  # bf16 output rounding
    assert relative_error(out, x.float() @ weight.t()) < 6e-2  # e4m3's own error on both operands


def tiny_dir(tmp_path: Path) -> Path:

    tiny_llama_config().save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, 160)
    return tmp_path


def test_quantization_fp8_on_load_runs_scaled_mm_and_stays_close_to_bf16(tmp_path: Path) -> None:
    directory = tiny_dir(tmp_path)
    common = dict(model=str(directory), device="cuda", dtype="bfloat16", load_format="dummy")
    fp8 = load_model(ModelConfig(**common, quantization="fp8"))
    bf16 = load_model(ModelConfig(**common))
    kinds = {type(m.form).__name__ for m in fp8.model.modules() if isinstance(m, Fp8Linear)}
    assert kinds == ({"ScaledMMWeight"} if fp8_matmuls() else set())  # dequantized: the float layers are back
    got = PagedRunner(fp8.model, fp8.hf_config).step([(0, PROMPTS[2])])[0]
    want = PagedRunner(bf16.model, bf16.hf_config).step([(0, PROMPTS[2])])[0]
    assert relative_error(got, want) < 0.15  # e4m3 weights and activations: a few percent a layer


@pytest.mark.parametrize("desc_act", [False, True], ids=["groups", "act-order"])
def test_a_gptq_checkpoint_runs_the_triton_kernel_with_the_references_logits(tmp_path: Path, desc_act: bool) -> None:
    reference = write_int4_checkpoint(tmp_path, method="gptq", group_size=32, desc_act=desc_act)
    loaded = load_model(ModelConfig(str(tmp_path), device="cuda", dtype="float32"))
    layers = [m for m in loaded.model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(isinstance(layer.form, PackedInt4) for layer in layers)
    got = PagedRunner(loaded.model, loaded.hf_config).step([(0, PROMPTS[2])])[0]
    assert relative_error(got.cpu(), hf_logits(reference, PROMPTS[2])) < 1e-3  # tf32 attention dots
