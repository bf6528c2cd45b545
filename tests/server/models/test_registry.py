"""Model specs resolve to sources, and what cannot be served fails with a ModelLoadError that says why."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest

from weir_server.config import ModelConfig
from weir_server.errors import ModelLoadError
from weir_server.models.bert import BertModel
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import load_model
from weir_server.models.registry import lookup_architecture, resolve_source


def test_packaged_smollm2_resolves_to_its_gguf_file():
    source = resolve_source("smollm2-135m-instruct")
    assert source.is_gguf
    assert (source.directory / source.gguf_file).is_file()
    assert source.gguf_file.endswith(".gguf")


def test_packaged_minilm_resolves_to_its_folder():
    source = resolve_source("all-MiniLM-L6-v2")  # short names are case-insensitive
    assert not source.is_gguf
    assert (source.directory / "config.json").is_file()


def test_gguf_file_path_resolves_to_its_folder_and_name():
    packaged = resolve_source("smollm2-135m-instruct")
    source = resolve_source(str(packaged.directory / packaged.gguf_file))
    assert source.directory == packaged.directory and source.gguf_file == packaged.gguf_file


def test_missing_local_path_names_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no such file or directory") as caught:
        resolve_source(missing)
    assert missing in str(caught.value)


def test_folder_without_config_or_gguf_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_hub_id_while_offline_names_the_model(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="some-org/not-a-packaged-model") as caught:
        resolve_source("some-org/not-a-packaged-model")
    assert "smollm2-135m-instruct" in str(caught.value)  # it lists what is available offline


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 1})
    )
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel") as caught:
        load_model(ModelConfig(str(tmp_path), load_format="dummy"))
    assert "LlamaForCausalLM" in str(caught.value) and "BertModel" in str(caught.value)


def test_architectures_map_to_our_classes_and_tasks():
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert lookup_architecture(name).model_class is LlamaForCausalLM
        assert lookup_architecture(name).task == "generate"
    assert lookup_architecture("BertModel").model_class is BertModel
    assert lookup_architecture("BertForMaskedLM").task == "embed"


def test_asking_an_embedding_model_to_generate_fails():
    with pytest.raises(ModelLoadError, match="embed"):
        load_model(ModelConfig("all-minilm-l6-v2"), task="generate")


def test_unknown_load_format_dtype_and_device_are_rejected():
    for config in (
        ModelConfig("all-minilm-l6-v2", load_format="pickle"),
        ModelConfig("all-minilm-l6-v2", dtype="float8"),
        ModelConfig("all-minilm-l6-v2", device="tpu:7"),
    ):
        with pytest.raises(ModelLoadError):
            load_model(config)
