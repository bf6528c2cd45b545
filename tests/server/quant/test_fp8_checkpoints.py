"""FP8 checkpoints (e4m3 weights with per-tensor or per-channel `weight_scale`) and `--quantization fp8` on a float
checkpoint load on a CPU (dequantized to the model's dtype there) with the logits and greedy tokens of a transformers
model holding the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_checks import assert_chunked_prefill_and_decode_match, assert_engine_greedy_matches, random_causal_lm
from paged_runner import save_tiny_tokenizer
from quantized_checkpoints import (
    fp8_on_load_reference,
    rewrite_config,
    tiny_llama_config,
    tiny_phi3_config,
    write_fp8_checkpoint,
)

from weir_server.config import ModelConfig
from weir_server.errors import ModelLoadError
from weir_server.layers.fp8_linear import Fp8Linear
from weir_server.models.loader import load_model
from weir_server.models.quant_config import quant_config_of


def dequantized_to_float_layers(loaded) -> bool:
    """On a CPU (no FP8 matmul) the projections are the model's own float layers again, in its dtype."""
    projections = [m for name, m in loaded.model.named_modules() if name.endswith(("qkv_proj", "gate_up_proj"))]
    return len(projections) == 4 and all(
        not isinstance(m, Fp8Linear) and m.weight.dtype == torch.float32 for m in projections
    )


def load(directory: Path, **options):
    return load_model(ModelConfig(str(directory), device="cpu", dtype="float32", **options))


@pytest.mark.parametrize("scales", ["per-channel", "per-tensor-static", "phi3-per-channel", "phi3-per-tensor"])
def test_an_fp8_checkpoint_matches_its_dequantized_weights(tmp_path: Path, scales: str) -> None:
    hf_config = tiny_phi3_config() if scales.startswith("phi3") else None  # fused q/k/v, gate/up in the checkpoint
    reference = write_fp8_checkpoint(
        tmp_path, per_channel=scales.endswith("per-channel"), static=scales.endswith("static"), hf_config=hf_config
    )
    loaded = load(tmp_path)
    assert dequantized_to_float_layers(loaded)
    assert_chunked_prefill_and_decode_match(reference, loaded)
    assert_engine_greedy_matches(reference, loaded, late=[9, 8, 7, 6, 5, 4])


def test_quantization_fp8_quantizes_a_float_checkpoint_per_channel(tmp_path: Path) -> None:
    model = random_causal_lm(tiny_llama_config())
    model.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, 160)
    loaded = load(tmp_path, quantization="fp8")
    reference = fp8_on_load_reference(model)
    assert_chunked_prefill_and_decode_match(reference, loaded)
    assert_engine_greedy_matches(reference, loaded, late=[9, 8, 7, 6, 5, 4])


def test_quantization_fp8_takes_dummy_weights(tmp_path: Path) -> None:
    tiny_llama_config().save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, 160)
    loaded = load(tmp_path, quantization="fp8", load_format="dummy")
    assert dequantized_to_float_layers(loaded)


def test_compressed_tensors_float8_reads_as_fp8() -> None:
    raw = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                "input_activations": {"type": "float", "num_bits": 8, "dynamic": True},
            }
        },
    }
    config = type("Config", (), {"quantization_config": raw})()
    quant = quant_config_of(config)
    assert quant is not None and quant.method == "fp8" and not quant.static_input_scale


def test_block_wise_fp8_scales_are_refused(tmp_path: Path) -> None:
    write_fp8_checkpoint(tmp_path, per_channel=True)
    rewrite_config(tmp_path, weight_block_size=[128, 128])
    with pytest.raises(ModelLoadError, match="weight_block_size .* is not supported; Weir runs per-tensor and per"):
        load(tmp_path)


def test_a_float_weight_in_an_fp8_checkpoint_names_the_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    write_fp8_checkpoint(tmp_path, per_channel=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].float()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=f"{name}: weight of dtype torch.float32, expected float8_e4m3fn"):
        load(tmp_path)


def test_quantization_awq_on_a_float_checkpoint_is_refused(tmp_path: Path) -> None:
    tiny_llama_config().save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, 160)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="--quantization awq: the checkpoint has no quantization_config"):
        load(tmp_path, quantization="awq")


def test_fp8_per_tensor_scales_over_two_tensor_parallel_ranks_match(tmp_path: Path) -> None:
    """Fused q/k/v parts keep their own per-tensor scales on each rank; row-parallel scales stay whole."""
    from family_checks import assert_checkpoint_on_two_ranks_matches

    reference = write_fp8_checkpoint(tmp_path, per_channel=False)
    assert_checkpoint_on_two_ranks_matches(reference, tmp_path)
