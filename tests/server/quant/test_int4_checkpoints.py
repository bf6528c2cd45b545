"""AWQ and GPTQ checkpoints (tiny random Llamas written as AutoAWQ / AutoGPTQ / GPTQModel write them) load with their
weights kept packed, and give the logits and greedy tokens of a transformers model holding the dequantized weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_checks import (
    assert_checkpoint_on_two_ranks_matches,
    assert_chunked_prefill_and_decode_match,
    assert_engine_greedy_matches,
)
from quantized_checkpoints import rewrite_config, tiny_phi3_config, write_int4_checkpoint

from weir_server.config import ModelConfig
from weir_server.errors import ModelLoadError
from weir_server.layers.int4_linear import Int4Linear
from weir_server.models.loader import LoadedModel, load_model

VARIANTS = {
    "awq-g128": dict(method="awq", group_size=128),
    "awq-g32": dict(method="awq", group_size=32),
    "gptq-g128": dict(method="gptq", group_size=128, fmt="gptq"),
    "gptq-sym": dict(method="gptq", group_size=64, fmt="gptq", sym=True),
    "gptq_v2-g64": dict(method="gptq", group_size=64, fmt="gptq_v2"),
    "gptq-act-order": dict(method="gptq", group_size=32, fmt="gptq", desc_act=True),
    "gptq_v2-act-order": dict(method="gptq", group_size=64, fmt="gptq_v2", desc_act=True),
    "phi3-awq": dict(method="awq", group_size=64, hf_config="phi3"),
    "phi3-gptq-act-order": dict(method="gptq", group_size=32, fmt="gptq", desc_act=True, hf_config="phi3"),
}


def load(directory: Path) -> LoadedModel:
    return load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))


@pytest.fixture(params=sorted(VARIANTS), scope="module")
def quantized(request, tmp_path_factory) -> tuple[torch.nn.Module, LoadedModel]:
    directory = tmp_path_factory.mktemp(request.param)
    options = dict(VARIANTS[request.param])
    if options.get("hf_config") == "phi3":  # q/k/v and gate/up fused in the checkpoint: cut per part at load
        options["hf_config"] = tiny_phi3_config()
    reference = write_int4_checkpoint(directory, **options)
    return reference, load(directory)


def test_projections_stay_packed(quantized) -> None:
    _, loaded = quantized
    layers = [m for m in loaded.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer
    packed_bytes = sum(b.numel() * b.element_size() for layer in layers for b in layer.buffers())
    float_bytes = sum(layer.in_features * layer.out_features * 4 for layer in layers)
    assert packed_bytes < float_bytes / 5  # 4 bits a weight plus scales and zeros, against float32's 32


def test_logits_match_the_dequantized_reference(quantized) -> None:
    reference, loaded = quantized
    assert_chunked_prefill_and_decode_match(reference, loaded)


def test_greedy_tokens_match_the_dequantized_reference(quantized) -> None:
    reference, loaded = quantized
    assert_engine_greedy_matches(reference, loaded, late=[9, 8, 7, 6, 5, 4])


def test_act_order_over_two_tensor_parallel_ranks_matches(tmp_path: Path) -> None:
    """Row-parallel shards of an act-order weight keep their rows' g_idx and every group: greedy tokens hold."""
    reference = write_int4_checkpoint(tmp_path, method="gptq", group_size=32, desc_act=True)
    assert_checkpoint_on_two_ranks_matches(reference, tmp_path)


# ---- bad checkpoints fail at load with one line naming what is supported --------------------------------------------


def load_error(directory: Path) -> str:
    with pytest.raises(ModelLoadError) as error:
        load(directory)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("awq")
    write_int4_checkpoint(directory, method="awq")
    return directory


def copy_of(directory: Path, tmp_path: Path) -> Path:
    for file in directory.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def test_an_unknown_quant_method_names_the_supported_ones(awq_dir: Path, tmp_path: Path) -> None:
    rewrite_config(copy_of(awq_dir, tmp_path), quant_method="bitsandbytes")
    message = load_error(tmp_path)
    assert "quant_method 'bitsandbytes' is not supported" in message and "awq, gptq, fp8" in message


def test_bits_other_than_4_are_refused(awq_dir: Path, tmp_path: Path) -> None:
    rewrite_config(copy_of(awq_dir, tmp_path), bits=8)
    assert "awq with bits=8 is not supported; Weir runs 4-bit" in load_error(tmp_path)


def test_an_unsupported_group_size_names_the_supported_ones(awq_dir: Path, tmp_path: Path) -> None:
    rewrite_config(copy_of(awq_dir, tmp_path), group_size=96)
    assert "group_size 96 is not supported; Weir runs group sizes 32, 64, 128" in load_error(tmp_path)


def test_a_quantized_lm_head_is_refused(awq_dir: Path, tmp_path: Path) -> None:
    rewrite_config(copy_of(awq_dir, tmp_path), lm_head=True)
    assert "awq with a quantized lm_head is not supported" in load_error(tmp_path)


def test_awq_gemv_is_refused(awq_dir: Path, tmp_path: Path) -> None:
    rewrite_config(copy_of(awq_dir, tmp_path), version="gemv")
    assert "AWQ version 'gemv' is not supported; Weir runs 'gemm'" in load_error(tmp_path)


def test_a_qweight_of_the_wrong_shape_names_the_tensor(awq_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy_of(awq_dir, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    message = load_error(tmp_path)
    assert "model.layers.1.mlp.down_proj.qweight: checkpoint shape (256, 15), expected (256, 16)" in message


def test_dummy_weights_with_a_4bit_checkpoint_are_refused(awq_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="--load-format dummy gives float weights; awq needs its checkpoint"):
        load_model(ModelConfig(str(awq_dir), device="cpu", dtype="float32", load_format="dummy"))
