"""A checkpoint Weir cannot serve fails the load with one line naming what is wrong and where: an unsupported
architecture or GGUF type names the supported ones; a truncated file, a tensor of the wrong shape or an unknown
tensor names the file and the tensor; `weir serve` exits 1 with that line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from paged_runner import LLAMA_HF_TO_GGUF, save_tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from weir_server.config import ModelConfig
from weir_server.errors import ModelLoadError
from weir_server.models.checkpoint_checks import supported_gguf_types
from weir_server.models.loader import load_model
from weir_server.models.registry import ARCHITECTURES

VOCAB = 64
WEIGHTS = "model.safetensors"
DOWN = "model.layers.0.mlp.down_proj.weight"  # [hidden 32, intermediate 48]


Tensors = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole tiny Llama saved by transformers, with a tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=2,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)
    return directory


def copy_with_weights(llama_dir: Path, target: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    shutil.copytree(llama_dir, target)
    state = load_file(llama_dir / WEIGHTS)
    change(state)
    save_file(state, target / WEIGHTS, metadata={"format": "pt"})
    return target


def load_error(spec: Path, **kwargs: str) -> str:
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelConfig(str(spec), device="cpu", dtype="float32", **kwargs))
    message = str(error.value)
    assert "\n" not in message
    return message


def write_llama_gguf(llama_dir: Path, path: Path, change: Callable[[Tensors], None] = lambda tensors: None) -> Path:
    """The tiny Llama as an fp32 GGUF of llama.cpp's `llama` layout, after `change` edits its tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(48)
    writer.add_embedding_length(32)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    names |= {f"model.layers.0.{hf}.weight": f"blk.0.{ours}" for hf, ours in LLAMA_HF_TO_GGUF.items()}
    state = load_file(llama_dir / WEIGHTS)
    tensors = {f"{ours}.weight": state[hf].numpy().astype(np.float32) for hf, ours in names.items()}
    change(tensors)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(path: Path, nbytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


# ---- architectures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "model_type"),
    [
        ("GPTNeoXForCausalLM", "gpt_neox"),  # transformers knows it, Weir does not
        ("MadeUpForCausalLM", "made_up"),  # transformers does not know it either
    ],
)
def test_an_unsupported_architecture_names_every_supported_one(
    llama_dir: Path, tmp_path: Path, architecture: str, model_type: str
) -> None:
    target = tmp_path / "model"
    shutil.copytree(llama_dir, target)
    config = json.loads((target / "config.json").read_text())
    config |= {"architectures": [architecture], "model_type": model_type}
    (target / "config.json").write_text(json.dumps(config))
    message = load_error(target)
    assert f"architecture {architecture!r} is not supported" in message
    for supported in ARCHITECTURES:
        assert supported in message


# ---- safetensors -----------------------------------------------------------------------------------------------


def test_the_untouched_checkpoint_loads(llama_dir: Path) -> None:
    assert load_model(ModelConfig(str(llama_dir), device="cpu", dtype="float32")).architecture == "LlamaForCausalLM"


def test_a_truncated_safetensors_file_names_the_file_and_the_tensor_cut_off(llama_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    shutil.copytree(llama_dir, target)
    truncate(target / WEIGHTS, 1000)
    message = load_error(target)
    assert str(target / WEIGHTS) in message and "truncated" in message
    assert "tensor 'model." in message  # the last tensor in the file's order


def test_a_safetensors_file_cut_inside_its_header_is_truncated(llama_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    shutil.copytree(llama_dir, target)
    (target / WEIGHTS).write_bytes((llama_dir / WEIGHTS).read_bytes()[:100])
    message = load_error(target)
    assert str(target / WEIGHTS) in message and "truncated" in message


def test_a_safetensors_tensor_of_the_wrong_shape_names_the_file_and_the_tensor(llama_dir: Path, tmp_path: Path) -> None:
    target = copy_with_weights(llama_dir, tmp_path / "model", lambda s: s.update({DOWN: torch.zeros(32, 40)}))
    message = load_error(target)
    assert str(target / WEIGHTS) in message
    assert DOWN in message and "(32, 40)" in message and "(32, 48)" in message


def test_an_unknown_safetensors_tensor_names_the_file_and_the_tensor(llama_dir: Path, tmp_path: Path) -> None:
    unknown = "model.layers.0.self_attn.mystery.weight"
    target = copy_with_weights(llama_dir, tmp_path / "model", lambda s: s.update({unknown: torch.zeros(3)}))
    message = load_error(target)
    assert str(target / WEIGHTS) in message and unknown in message and "has no place" in message


# ---- GGUF ------------------------------------------------------------------------------------------------------


def test_the_untouched_gguf_loads(llama_dir: Path, tmp_path: Path) -> None:
    path = write_llama_gguf(llama_dir, tmp_path / "tiny.gguf")
    loaded = load_model(ModelConfig(str(path), device="cpu", dtype="float32", tokenizer=str(llama_dir)))
    assert loaded.architecture == "LlamaForCausalLM"


def test_a_truncated_gguf_names_the_file_and_the_tensor_cut_off(llama_dir: Path, tmp_path: Path) -> None:
    path = write_llama_gguf(llama_dir, tmp_path / "tiny.gguf")
    truncate(path, 500)
    message = load_error(path, tokenizer=str(llama_dir))
    assert str(path) in message and "truncated" in message and "tensor 'blk.0.ffn_down.weight'" in message


def test_a_gguf_tensor_of_the_wrong_shape_names_the_file_and_the_tensor(llama_dir: Path, tmp_path: Path) -> None:
    def narrow_down(tensors: Tensors) -> None:
        tensors["blk.0.ffn_down.weight"] = np.zeros((32, 40), np.float32)

    path = write_llama_gguf(llama_dir, tmp_path / "tiny.gguf", narrow_down)
    message = load_error(path, tokenizer=str(llama_dir))
    assert str(path) in message and "'blk.0.ffn_down.weight'" in message and DOWN in message
    assert "(32, 40)" in message and "(32, 48)" in message


def test_an_unknown_gguf_tensor_names_the_file_and_the_tensor(llama_dir: Path, tmp_path: Path) -> None:
    def add_unknown(tensors: Tensors) -> None:
        tensors["blk.0.mystery.weight"] = np.zeros(3, np.float32)

    path = write_llama_gguf(llama_dir, tmp_path / "tiny.gguf", add_unknown)
    message = load_error(path, tokenizer=str(llama_dir))
    assert str(path) in message and "'blk.0.mystery.weight'" in message and "has no place" in message


def test_an_unsupported_gguf_type_names_the_supported_ones(llama_dir: Path, tmp_path: Path) -> None:
    def widen_down(tensors: Tensors) -> None:  # F64: a type GGUF has and no dequantizer reads
        tensors["blk.0.ffn_down.weight"] = tensors["blk.0.ffn_down.weight"].astype(np.float64)

    path = write_llama_gguf(llama_dir, tmp_path / "tiny.gguf", widen_down)
    message = load_error(path, tokenizer=str(llama_dir))
    assert str(path) in message and "'blk.0.ffn_down.weight'" in message and "F64" in message
    supported = supported_gguf_types()
    assert {"F32", "F16", "Q4_0", "Q8_0", "Q4_K"} <= set(supported) and "F64" not in supported
    assert f"supported types: {', '.join(supported)}" in message


# ---- the command -----------------------------------------------------------------------------------------------


def test_weir_serve_exits_1_with_the_one_line(llama_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    shutil.copytree(llama_dir, target)
    truncate(target / WEIGHTS, 1000)
    weir = Path(sys.executable).parent / "weir"
    command = [str(weir), "serve", str(target), "--embed-model", "none", "--port", "0", "--log-level", "warning"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "could not load a model" in result.stderr and str(target / WEIGHTS) in result.stderr
    assert "truncated: tensor 'model." in result.stderr
