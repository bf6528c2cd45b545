"""Making a generation engine: where its core runs (a thread here, or a process of its own), and the AsyncEngine
in front of it."""

from __future__ import annotations

import torch

from weir_server.config import EngineConfig
from weir_server.engine.async_engine import AsyncEngine
from weir_server.engine.core import EngineCore
from weir_server.engine.core_client import InProcessClient, ProcessClient
from weir_server.engine.output import OutputText
from weir_server.engine.structured import StructuredOutputs
from weir_server.models.loader import LoadedModel, load_model, resolve_device


def runs_in_own_process(config: EngineConfig) -> bool:
    """Whether the core gets a process of its own (ExecutorConfig.engine_core; auto = on CUDA)."""
    choice = config.executor.engine_core
    if choice == "auto":
        return resolve_device(config.model.device).type == "cuda"
    return choice == "process"


def create_engine(loaded: LoadedModel, config: EngineConfig) -> AsyncEngine:
    """The AsyncEngine for a generation model, not started. Its core runs where `config` says: on a thread here
    (`loaded` with its weights), or in a process of its own, which loads the weights itself and makes the text of
    choices with stop strings, the server process the rest (`loaded` then needs only its config and tokenizer)."""
    if runs_in_own_process(config):
        # Constraints compile here too (lazily) so a bad one is refused before it reaches the core.
        structured = StructuredOutputs(
            loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids, torch.device("cpu"), config.structured
        )
        return AsyncEngine(loaded, config, ProcessClient(config), structured, OutputText(loaded.tokenizer))
    return thread_engine(EngineCore(loaded, config))


def thread_engine(core: EngineCore) -> AsyncEngine:
    """The AsyncEngine of a core that steps on a thread of this process and makes all text itself."""
    return AsyncEngine(core.loaded, core.config, InProcessClient(core), core.structured)


def load_engine(config: EngineConfig) -> AsyncEngine:
    """Load the generation model where its core will run and create its engine, not started; blocking (call it off
    the event loop). A core on a thread here gets its tensor-parallel workers first (`EngineCore.from_config`)."""
    if runs_in_own_process(config):
        return create_engine(load_model(config.model, "generate", weights=False), config)
    return thread_engine(EngineCore.from_config(config))
