"""A tiny random Llama and the engine core over it, for the executor's and sampler's GPU tests (and their CPU
counterparts). The engine core is built in `engine_core` only, so an engine rename is a one-line change here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
from weir_server.engine.types import GenerationRequest
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import LoadedModel

VOCAB = 320


def tiny_loaded(device: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Two layers of hidden size 64, seeded weights large enough that greedy choices are not near-ties."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if "embed" in name else 0.2))
            elif not name.endswith("bias"):
                param.fill_(1.0)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model, config, None, "tiny", "LlamaForCausalLM", "generate", 512, VOCAB, dtype, torch.device(device), (1,),
        "last",
    )  # fmt: skip


def engine_core(loaded: LoadedModel, enforce_eager: bool, max_num_seqs: int = 32) -> Any:
    """The synchronous engine core (schedule, launch, read back, outputs) over `loaded`."""
    from weir_server.engine.core import EngineCore

    config = EngineConfig(
        ModelConfig("tiny"),
        CacheConfig(block_size=16, num_blocks=256),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=512),
        ExecutorConfig(enforce_eager=enforce_eager),
    )
    return EngineCore(loaded, config)


def run_requests(core: Any, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Add `requests`, step the core until all finish; the token ids of each request."""
    for request in requests:
        core.add_request(core.validate(request))
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
    return tokens


@pytest.fixture
def tiny_model() -> Callable[..., LoadedModel]:
    """tiny_loaded(device, dtype=float32) -> LoadedModel."""
    return tiny_loaded


@pytest.fixture
def make_core() -> Callable[..., Any]:
    """engine_core(loaded, enforce_eager, max_num_seqs=32) -> the engine core."""
    return engine_core


@pytest.fixture
def run() -> Callable[[Any, list[GenerationRequest]], dict[str, list[int]]]:
    """run_requests(core, requests) -> {request_id: token ids}."""
    return run_requests
