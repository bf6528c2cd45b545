"""Making a generation engine: where its core runs (a thread here, or a process of its own), and the AsyncEngine
in front of it. A core of its own process loads the model there, and this process never imports torch: the core
and the model loader are imported only for a core on a thread here."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from weir_server.config import EngineConfig
from weir_server.engine.async_engine import AsyncEngine
from weir_server.engine.constraint_validator import ConstraintValidator
from weir_server.engine.core_client import InProcessClient, ProcessClient
from weir_server.engine.output import OutputText
from weir_server.engine.wire import ModelDescription

if TYPE_CHECKING:
    from weir_server.engine.core import EngineCore
    from weir_server.models.loader import LoadedModel


def runs_in_own_process(config: EngineConfig) -> bool:
    """Whether the core gets a process of its own (ExecutorConfig.engine_core; auto = on CUDA)."""
    choice = config.executor.engine_core
    if choice == "auto":
        from weir_server.models.loader import resolve_device  # imports torch, to ask for CUDA

        return resolve_device(config.model.device).type == "cuda"
    return choice == "process"


def server_engine_config(config: EngineConfig, embeds_here: bool) -> EngineConfig:
    """The engine config a server runs: there `--engine-core auto` gives the core a process of its own, unless an
    embedding model runs in the server process too. On CPU the process measured 1.0-1.9x the tokens/s of a thread
    at 8 and 32 streams for about 140 MiB more, and the server process stays free of torch; an embedding model
    loads torch into the server process anyway, so there `auto` keeps a thread on CPU (a process on CUDA)."""
    if config.executor.engine_core != "auto" or embeds_here:
        return config
    return dataclasses.replace(config, executor=dataclasses.replace(config.executor, engine_core="process"))


def create_engine(loaded: LoadedModel, config: EngineConfig) -> AsyncEngine:
    """The AsyncEngine for a generation model, not started. Its core runs where `config` says: on a thread here
    (`loaded` with its weights), or in a process of its own, which loads the weights itself (`loaded` then needs
    only its config and tokenizer)."""
    if runs_in_own_process(config):
        return process_engine(loaded, config, ProcessClient(config))
    from weir_server.engine.core import EngineCore

    return thread_engine(EngineCore(loaded, config))


def process_engine(model: LoadedModel | ModelDescription, config: EngineConfig, client: ProcessClient) -> AsyncEngine:
    """The AsyncEngine of a core in a process of its own, which makes the text of choices with stop strings; this
    process makes the rest, and vets constraints (in worker processes) so a bad one is refused before it reaches
    the core."""
    validator = ConstraintValidator(model.tokenizer, model.vocab_size, model.eos_token_ids, config.structured)
    return AsyncEngine(model, config, client, validator, OutputText(model.tokenizer))


def thread_engine(core: EngineCore) -> AsyncEngine:
    """The AsyncEngine of a core that steps on a thread of this process and makes all text itself."""
    return AsyncEngine(core.loaded, core.config, InProcessClient(core), core.structured)


def load_engine(config: EngineConfig) -> AsyncEngine:
    """Load the generation model where its core will run and create its engine, not started; blocking (call it off
    the event loop). A core process is launched here and describes the model it loaded; a core on a thread here
    gets its tensor-parallel workers first (`EngineCore.from_config`)."""
    if runs_in_own_process(config):
        client = ProcessClient(config)
        model = client.launch().model
        assert model is not None  # a core process always describes its model
        return process_engine(model, config, client)
    from weir_server.engine.core import EngineCore

    return thread_engine(EngineCore.from_config(config))
