"""Load a model for serving: config and tokenizer through transformers, weights streamed into our own modules."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from weir_server.config import ModelConfig
from weir_server.distributed import parallel_state
from weir_server.errors import ModelLoadError
from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.fp8_linear import Fp8Linear, quantize_fp8_layers, restore_dequantized_layers
from weir_server.layers.gguf_weights import Int8BlockRows
from weir_server.layers.int4_linear import Int4Linear, quantize_int4_layers
from weir_server.layers.quantized_linear import GGUFLinear, quantize_gguf_layers
from weir_server.models.checkpoint_checks import check_gguf_tensors, check_safetensors_file, open_gguf
from weir_server.models.gguf_sharing import shared_gguf_readers
from weir_server.models.gguf_tensors import gguf_config_fixes, int8_head_rows, iter_gguf_tensors
from weir_server.models.quant_config import QuantConfig, QuantConfigError, quant_config_of
from weir_server.models.registry import (
    ModelSource,
    Task,
    architecture_of,
    gguf_model_types,
    lookup_architecture,
    resolve_source,
)
from weir_server.process_lifetime import trim_heap
from weir_server.progress import progress

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass
class LoadedModel:
    """A model ready to run, with everything the engines need to know about it."""

    model: nn.Module | None  # None when only described: the weights live in an engine-core process
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    architecture: str
    task: Literal["generate", "embed"]
    max_model_len: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: tuple[int, ...]
    pooling: str  # "mean" | "cls" | "last" (embed models)


def load_model(config: ModelConfig, task: Task | None = None, weights: bool = True, lora: bool = False) -> LoadedModel:
    """Resolve, build and fill the model `config` names; raise ModelLoadError with the reason if impossible.
    With `weights=False` only its config and tokenizer are read (a frontend of an engine-core process). `lora`: LoRA
    will wrap the shared linear layers, so a GGUF's come as float ones."""
    with shared_gguf_readers():  # a GGUF file is parsed once, not once per reader of it
        loaded = _load_model(config, task, weights, lora)
    trim_heap()  # what the load freed (a GGUF file's metadata, its dequantized tensors) lies among what stays
    return loaded


def _load_model(config: ModelConfig, task: Task | None, weights: bool, lora: bool) -> LoadedModel:
    started = time.perf_counter()
    if config.load_format not in _LOAD_FORMATS:
        raise ModelLoadError(f"load_format {config.load_format!r} is not one of {', '.join(_LOAD_FORMATS)}")
    if config.trust_remote_code:
        logger.warning(
            "trust_remote_code: transformers may run code from the model's repo for its config and tokenizer"
        )
    source = resolve_source(config.model, config.revision, config.download_dir)
    logger.info("Loading model %r from %s", config.model, source.description)
    if source.is_gguf:
        open_gguf(source.directory / str(source.gguf_file))  # a cut file or unreadable type: before transformers
    hf_config = _load_hf_config(source, config.trust_remote_code)
    architecture = architecture_of(hf_config)
    entry = lookup_architecture(architecture, task)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, entry.task)
    logger.info("Architecture %s (%s), %s on %s", architecture, entry.task, dtype, device)

    model = _build_model(config, source, hf_config, entry.model_class, device, dtype, lora) if weights else None
    tokenizer = _load_tokenizer(source, config)
    loaded = LoadedModel(
        model=model,
        hf_config=hf_config,
        tokenizer=tokenizer,
        model_id=config.served_name or config.model,
        architecture=architecture,
        task=entry.task,
        max_model_len=_max_model_len(hf_config, config.max_model_len),
        vocab_size=int(hf_config.vocab_size),
        dtype=dtype,
        device=device,
        eos_token_ids=_eos_token_ids(source, hf_config, tokenizer),
        pooling=_pooling(source) if entry.task == "embed" else "last",
    )
    num_params = _num_weights(model) if model is not None else 0
    logger.info(
        "Loaded %s: %.1fM parameters, max_model_len %d, in %.1fs",
        loaded.model_id,
        num_params / 1e6,
        loaded.max_model_len,
        time.perf_counter() - started,
    )
    return loaded


def _num_weights(model: nn.Module) -> int:
    """Parameters, counting each quantized projection's weights (held as packed buffers) one by one."""
    quantized = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear | Fp8Linear | GGUFLinear)
    )
    return sum(p.numel() for p in model.parameters()) + quantized


def _build_model(
    config: ModelConfig,
    source: ModelSource,
    hf_config: PretrainedConfig,
    model_class: type[nn.Module],
    device: torch.device,
    dtype: torch.dtype,
    lora: bool,
) -> nn.Module:
    weights: _WeightStream | None = None
    try:
        gguf_layers = source.is_gguf and config.load_format != "dummy" and _shards_on_load(model_class)
        dense_copies = gguf_layers and not config.keep_quantized and _blocks_beside_floats(device, dtype, lora)
        keep_packed = gguf_layers and (config.keep_quantized or dense_copies)
        quant = _quant_config(config, source, hf_config, model_class)
        prepare: Callable[[nn.Module], object] | None = None
        if keep_packed:
            prepare = functools.partial(quantize_gguf_layers, dense_copies=dense_copies)
        if quant is not None:
            logger.info("Quantized linear layers: %s", quant)
            swap = quantize_int4_layers if quant.is_int4 else quantize_fp8_layers
            prepare = functools.partial(swap, quant=quant)
        model = _build_empty(model_class, hf_config, device, dtype, prepare)
        std = float(getattr(hf_config, "initializer_range", 0.02))
        if config.load_format == "dummy" and _shards_on_load(model):
            model.load_weights(_dummy_checkpoint(hf_config, config.seed, std, device))  # type: ignore[operator]
        elif config.load_format == "dummy":
            _init_dummy_weights(model, config.seed, std)
        else:
            lazy = _shards_on_load(model)
            stream = _iter_weights(source, config.load_format, hf_config, lazy=lazy, keep_packed=keep_packed)
            weights = _WeightStream(stream)
            model.load_weights(weights)  # type: ignore[operator]
        if quant is not None and quant.method == "fp8":
            restore_dequantized_layers(model)  # no FP8 matmul here: plain float layers, packed like any other
        cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16  # whose head is packed (layers/cpu_linear.py)
        if source.is_gguf and not keep_packed and config.load_format != "dummy" and cpu_bf16:
            _keep_int8_head(model, source)
    except (ValueError, OSError, RuntimeError, SafetensorError) as error:  # bad shapes or names, unreadable files
        where = (weights.where(error) if weights is not None else "") or f"model {config.model!r}: "
        message = " ".join(str(error).split())  # one line
        raise ModelLoadError(f"{where}{message}") from error
    return model.eval()


def _blocks_beside_floats(device: torch.device, dtype: torch.dtype, lora: bool) -> bool:
    """Whether a GGUF's dequantizing load keeps the file's blocks too: a one-rank bf16 model on a CPU with the C++
    ops, whose integer-dot matmuls read them for steps of a few rows (2-4x fewer bytes than bf16; layers/cpu_linear.py)
    while larger steps multiply the bf16 copies. LoRA wraps only the shared float layers."""
    if device.type != "cpu" or dtype != torch.bfloat16 or lora or parallel_state.tp_size() != 1:
        return False
    return cpu_ops() is not None


def _keep_int8_head(model: nn.Module, source: ModelSource) -> None:
    """A dequantized GGUF whose head the file stores as int8 blocks (Q8_0, Q6_K, Q5_K) keeps those rows too, as
    `lm_head.int8_rows`: the CPU's packed head reads them for steps of a few rows (cpu_linear.PackedLMHead)."""
    head = getattr(model, "lm_head", None)
    if head is None or getattr(head, "tp_size", 1) != 1 or not hasattr(head, "compute_logits"):
        return
    tied = bool(getattr(model, "tie_word_embeddings", False))
    found = int8_head_rows(open_gguf(source.directory / str(source.gguf_file)), tied)
    if found is None or found[0].shape[0] != head.weight.shape[0]:
        return
    raw, qtype = found
    head.int8_rows = Int8BlockRows(raw, qtype, head.weight.dtype)
    logger.info("LM head: the file's %s rows kept for CPU steps of a few rows", qtype.name)


def _quant_config(
    config: ModelConfig, source: ModelSource, hf_config: PretrainedConfig, model_class: type[nn.Module]
) -> QuantConfig | None:
    """The checkpoint's AWQ / GPTQ / FP8 quantization (or --quantization fp8's), checked against how it loads."""
    requested = None if config.quantization in (None, "none", "auto", "gguf") else config.quantization
    if source.is_gguf:
        if requested is not None:
            raise ModelLoadError(f"--quantization {requested} takes a safetensors checkpoint, not a GGUF file")
        return None
    try:
        quant = quant_config_of(hf_config, requested)
    except QuantConfigError as error:
        raise ModelLoadError(f"model {config.model!r}: {error}") from error
    if quant is None:
        return None
    if not _shards_on_load(model_class):
        raise ModelLoadError(
            f"model {config.model!r}: {quant.method} weights are not supported for {model_class.__name__}"
        )
    if config.load_format == "dummy":
        if quant.is_int4:
            raise ModelLoadError(
                f"model {config.model!r}: --load-format dummy gives float weights; {quant.method} needs its checkpoint "
                "(--quantization fp8 quantizes dummy weights)"
            )
        return dataclasses.replace(quant, quantize_on_load=True, static_input_scale=False)
    return quant


class _WeightStream:
    """The (name, tensor) pairs a model's load_weights reads, remembering the file and name of the last one, so
    that an error raised while loading it can name both."""

    def __init__(self, tensors: Iterator[tuple[Path, str, Any]]) -> None:
        self._tensors = tensors
        self.file: Path | None = None
        self.name = ""
        self.finished = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for file, name, tensor in self._tensors:
            self.file, self.name = file, name
            yield name, tensor
        self.finished = True  # later errors (tensors missing) are the whole checkpoint's

    def where(self, error: BaseException) -> str:
        """`file: ` or `file, tensor 'name': ` (when the error does not name it) for an error while loading."""
        if self.file is None or self.finished:
            return ""
        tensor = "" if self.name in str(error) else f", tensor {self.name!r}"
        return f"{self.file}{tensor}: "


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ModelLoadError(f"device {name!r} is not a valid torch device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} was asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device, task: Task = "generate") -> torch.dtype:
    """`auto` is bfloat16 on CUDA; on CPU it is bfloat16 for generation where matmuls run natively in bf16 (AMX
    or AVX512-BF16: several times faster, same greedy answers), else float32. CPU embeddings stay float32:
    the encoders are small and callers compare vectors against the reference model's."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if task == "generate" and cpu_has_fast_bf16() else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (AMX tiles or AVX512-BF16); elsewhere it emulates bf16,
    which is slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    # torch.cpu exposes the CPUID checks only under private names; a torch without them gets fp32.
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def _load_hf_config(source: ModelSource, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(
            str(source.directory), gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        message = " ".join(str(error).split())  # transformers' messages run over several lines
        if source.is_gguf:
            readable = ", ".join(gguf_model_types())
            raise ModelLoadError(
                f"model {source.spec!r}: cannot read its GGUF config: {message} (Weir reads GGUF files of: {readable})"
            ) from error
        _refuse_unsupported_architecture(source)  # a model type transformers lacks fails it first; name ours
        raise ModelLoadError(f"model {source.spec!r}: cannot read its config: {message}") from error
    if source.is_gguf:
        for field, value in gguf_config_fixes(open_gguf(source.directory / str(source.gguf_file)), config).items():
            setattr(config, field, value)
    return config  # type: ignore[no-any-return]


def _refuse_unsupported_architecture(source: ModelSource) -> None:
    """The registry's error naming every supported architecture, if config.json declares one we lack."""
    try:
        raw = json.loads((source.directory / "config.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(raw, dict):
        declared = SimpleNamespace(architectures=raw.get("architectures"), model_type=raw.get("model_type", ""))
        lookup_architecture(architecture_of(declared))


def _load_tokenizer(source: ModelSource, config: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's own tokenizer, or the one `config.tokenizer` names (a directory or hub id)."""
    try:
        if config.tokenizer is not None:
            tokenizer = AutoTokenizer.from_pretrained(
                config.tokenizer,
                revision=config.tokenizer_revision,
                cache_dir=config.download_dir,
                trust_remote_code=config.trust_remote_code,
            )
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                str(source.directory), gguf_file=source.gguf_file, trust_remote_code=config.trust_remote_code
            )
    except (OSError, ValueError, KeyError) as error:
        which = f"tokenizer {config.tokenizer!r}" if config.tokenizer is not None else "its tokenizer"
        raise ModelLoadError(f"model {source.spec!r}: cannot load {which}: {error}") from error
    return tokenizer  # type: ignore[no-any-return]


def _shards_on_load(model: nn.Module | type[nn.Module]) -> bool:
    """Whether the model's load_weights takes lazy slices and full checkpoint tensors and shards them itself."""
    return bool(getattr(model, "shards_weights_on_load", False))


def _iter_weights(
    source: ModelSource, load_format: str, hf_config: PretrainedConfig, lazy: bool = False, keep_packed: bool = False
) -> Iterator[tuple[Path, str, Any]]:
    """(file, HF name, tensor) from the source's GGUF file or safetensors (or legacy .bin) files; with `lazy`,
    safetensors come as slices read on indexing, so a tensor-parallel rank reads only its part; with `keep_packed`,
    GGUF tensors of the quantized types come packed (QuantizedTensor)."""
    if load_format == "gguf" and not source.is_gguf:
        raise ModelLoadError(f"model {source.spec!r}: load_format 'gguf' but the source is not a .gguf file")
    if load_format == "safetensors" and source.is_gguf:
        raise ModelLoadError(f"model {source.spec!r}: load_format 'safetensors' but the source is a .gguf file")
    if source.is_gguf:
        return _iter_gguf(source, hf_config, keep_packed=keep_packed)
    files = sorted(source.directory.glob("*.safetensors"))
    if files:
        return _iter_safetensors(files, lazy)
    bins = sorted(source.directory.glob("pytorch_model*.bin"))
    if bins and load_format == "auto":
        return _iter_torch_bins(bins)
    raise ModelLoadError(
        f"model {source.spec!r}: no weight files in {source.directory} (use load_format 'dummy' for random weights)"
    )


def _iter_safetensors(files: list[Path], lazy: bool = False) -> Iterator[tuple[Path, str, Any]]:
    from safetensors import safe_open

    def tensors() -> Iterator[tuple[Path, str, Any]]:
        for path in files:
            logger.debug("Reading weights from %s", path.name)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield path, name, f.get_slice(name) if lazy else f.get_tensor(name)

    total = 0
    for path in files:  # only the headers: the count the progress bar needs, and a truncated file caught early
        check_safetensors_file(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                total += len(f.keys())
        except SafetensorError as error:
            raise ModelLoadError(f"{path}: not a readable safetensors file: {error}") from error
    desc = f"Loading safetensors ({len(files)} shard{'s' if len(files) > 1 else ''})"
    yield from progress(tensors(), desc, total, "tensors")


def _iter_torch_bins(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for path in files:
        logger.info("Reading weights from %s", path.name)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            yield path, name, tensor


def _iter_gguf(
    source: ModelSource, hf_config: PretrainedConfig, keep_packed: bool = False
) -> Iterator[tuple[Path, str, Any]]:
    """GGUF tensors under HF names: with `keep_packed`, the types Weir has kernels for as QuantizedTensor
    (models/gguf_tensors.py), else all dequantized, one tensor at a time.

    transformers maps GGUF tensor names by walking a model's state dict, so it gets a weightless
    (meta-device) transformers model of the same config; the weights themselves land in ours.
    """
    from transformers import AutoModelForCausalLM

    path = source.directory / str(source.gguf_file)
    logger.info("%s GGUF tensors from %s", "Loading" if keep_packed else "Dequantizing", path.name)
    with torch.device("meta"):
        name_model = AutoModelForCausalLM.from_config(hf_config)
    reader = open_gguf(path)
    check_gguf_tensors(reader, path, name_model)  # transformers would drop unknown ones silently
    tensors = iter_gguf_tensors(reader, name_model, hf_config, keep_packed=keep_packed)
    drop_pages = getattr(reader, "drop_pages", None)  # a shared reader's (gguf_sharing)
    for name, tensor in progress(tensors, "Loading GGUF tensors", len(reader.tensors), "tensors"):
        yield path, name, tensor
        if drop_pages is not None:
            drop_pages()  # the tensor is copied out: the file's pages need not stay resident until the load ends


def _build_empty(
    model_class: type[nn.Module],
    hf_config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    prepare: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """The model with uninitialized weights on `device`, built without spending time on a random init;
    `prepare` may swap its layers while it is still weightless (quantized ones)."""
    with torch.device("meta"):
        model = model_class(hf_config)
    if prepare is not None:
        prepare(model)
    # Materializing replaces every parameter, which would untie shared ones (tied embeddings); re-tie them.
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    model = model.to(dtype).to_empty(device=device)
    for first, *aliases in tied.values():
        for alias in aliases:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    return model


def _dummy_checkpoint(
    hf_config: PretrainedConfig, seed: int, std: float, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """A seeded random checkpoint under the HF names and full shapes (matrices ~ N(0, std), biases 0, norm
    scales 1), on `device`: every tensor-parallel size shards the very same weights. Drawn on the CPU and then
    moved, so every device gets the same weights for one seed (CPU and CUDA generators differ)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(hf_config)  # names and shapes only
    generator = torch.Generator().manual_seed(seed)
    for name, param in reference.named_parameters():
        if param.dim() >= 2:
            yield name, torch.randn(param.shape, generator=generator).mul_(std).to(device)
        elif name.endswith("bias"):
            yield name, torch.zeros(param.shape, device=device)
        else:
            yield name, torch.ones(param.shape, device=device)


def _init_dummy_weights(model: nn.Module, seed: int, std: float) -> None:
    """Deterministic random weights: matrices ~ N(0, std), biases 0, norm scales 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                values = torch.randn(param.shape, generator=generator) * std
            elif name.endswith("bias"):
                values = torch.zeros(param.shape)
            else:
                values = torch.ones(param.shape)
            param.copy_(values)


def _max_model_len(hf_config: PretrainedConfig, cap: int | None) -> int:
    model_len = int(getattr(hf_config, "max_position_embeddings", None) or 2048)
    if cap is None:
        return model_len
    if cap < 1:
        raise ModelLoadError(f"max_model_len must be at least 1, got {cap}")
    if cap > model_len:
        logger.warning("max_model_len %d exceeds the model's %d positions; using %d", cap, model_len, model_len)
    return min(cap, model_len)


def _eos_token_ids(
    source: ModelSource, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, ...]:
    """Every id that ends generation: the generation config's, the model config's, then the tokenizer's."""
    candidates: list[Any] = []
    if (source.directory / "generation_config.json").exists() and not source.is_gguf:
        candidates.append(GenerationConfig.from_pretrained(str(source.directory)).eos_token_id)
    candidates.append(getattr(hf_config, "eos_token_id", None))
    candidates.append(tokenizer.eos_token_id)
    ids: list[int] = []
    for candidate in candidates:
        for token_id in candidate if isinstance(candidate, list | tuple) else [candidate]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def _pooling(source: ModelSource) -> str:
    """The sentence-transformers pooling mode from `1_Pooling/config.json` if there is one, else mean."""
    path = source.directory / "1_Pooling" / "config.json"
    if not path.exists():
        return "mean"
    settings = json.loads(path.read_text())
    for key, mode in (
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_lasttoken", "last"),
        ("pooling_mode_mean_tokens", "mean"),
    ):
        if settings.get(key):
            return mode
    logger.warning("Pooling config %s asks for a mode Weir lacks; using mean pooling", path)
    return "mean"
