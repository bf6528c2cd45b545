"""The models a server serves (`ServedModels`): loading them off the event loop and resolving a request's `model`
field (a model's id, or, as in vLLM, a LoRA adapter's name standing for its base model with that adapter). Not to be
confused with `models/registry.py`, the architectures Weir can build."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from weir_server.api.errors import AdapterNotFoundError, FailedPreconditionError
from weir_server.chat.frontend import ChatFrontend
from weir_server.config import ModelConfig, ServerConfig
from weir_server.engine.async_engine import AsyncEngine
from weir_server.engine.factory import load_engine, server_engine_config
from weir_server.engine.types import AdapterInfo
from weir_server.engine.wire import ModelDescription
from weir_server.errors import EngineUnavailableError, InvalidRequestError, ModelNotFoundError
from weir_server.tokenization import Tokenizer

if TYPE_CHECKING:
    from weir_server.engine.embedding_engine import EmbeddingEngine
    from weir_server.models.loader import LoadedModel

Task = Literal["generate", "embed"]
_TASK_WORDS = {"generate": "text generation", "embed": "embeddings"}
ENABLE_LORA_HINT = "start the server with --enable-lora to serve LoRA adapters"


@dataclass
class ServedModel:
    """One loaded model with its tokenizer and the engine that runs it."""

    loaded: LoadedModel | ModelDescription  # described only where its engine core has a process of its own
    tokenizer: Tokenizer
    generator: AsyncEngine | None = None
    embedder: EmbeddingEngine | None = None
    chat: ChatFrontend | None = None  # generation models: templates, tool calls, reasoning
    is_default: bool = False
    load_duration_s: float = 0.0  # weights and engine, for the model-load-time metric

    @property
    def id(self) -> str:
        return self.loaded.model_id

    @property
    def task(self) -> Task:
        return self.loaded.task

    @property
    def lora_enabled(self) -> bool:
        """Whether this model's engine serves LoRA adapters (--enable-lora)."""
        return self.generator is not None and self.generator.config.lora is not None

    def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters loaded on this model, in load order (none when LoRA is off)."""
        return self.generator.list_adapters() if self.generator is not None and self.lora_enabled else []

    def check_adapter(self, name: str, field: str) -> None:
        """FAILED_PRECONDITION when this model serves no adapters, NOT_FOUND when `name` is not one of them."""
        if not self.lora_enabled:
            raise FailedPreconditionError(f"{field}: model {self.id!r} serves no LoRA adapters; {ENABLE_LORA_HINT}")
        names = [a.name for a in self.adapters()]
        if name not in names:
            loaded = ", ".join(names) or "none"
            raise AdapterNotFoundError(
                field, f"LoRA adapter {name!r} is not loaded on model {self.id!r}; loaded adapters: {loaded}"
            )


class ServedModels:
    """Served models by id; the first model of each task is its default."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self.ready = False

    def add(self, model: ServedModel) -> None:
        if model.id in self._models:
            raise ValueError(f"two models are served as {model.id!r}; give one a different served name")
        model.is_default = self.default(model.task) is None
        self._models[model.id] = model

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def find(self, name: str) -> ServedModel | None:
        """The model served as `name`, or None (no adapter lookup)."""
        return self._models.get(name)

    def adapter_owner(self, name: str) -> ServedModel | None:
        """The generation model that has the LoRA adapter `name` loaded, or None."""
        for model in self._models.values():
            if any(a.name == name for a in model.adapters()):
                return model
        return None

    def resolve_generation(self, name: str, adapter: str) -> tuple[ServedModel, str | None]:
        """The generation model and adapter a Generate request names. `model` may be an adapter's name (the OpenAI
        API has no other field for it), which stands for its base model with that adapter."""
        if name and self.ready and name not in self._models:
            owner = self.adapter_owner(name)
            if owner is not None:
                if adapter and adapter != name:
                    raise InvalidRequestError(
                        "adapter", f"names adapter {adapter!r} but `model` names adapter {name!r}; give one"
                    )
                return owner, name
        model = self.get(name, "generate")
        if not adapter:
            return model, None
        model.check_adapter(adapter, "adapter")
        return model, adapter

    def default(self, task: Task) -> ServedModel | None:
        return next((m for m in self._models.values() if m.task == task and m.is_default), None)

    def get(self, name: str, task: Task | None) -> ServedModel:
        """The model a request names (empty = the task's default; task None = any, generation first; an adapter's
        name = its base model)."""
        if not self.ready:
            raise EngineUnavailableError("the server is still loading its models; retry shortly")
        if not name:
            model = self.default(task or "generate") or (None if task else self.default("embed"))
            if model is None:
                raise ModelNotFoundError(f"no {_TASK_WORDS[task or 'generate']} model is loaded on this server")
            return model
        # A LoRA adapter's name stands for its base model (its tokenizer, its load); Generate resolves it with the
        # adapter in resolve_generation.
        model = self._models.get(name) or self.adapter_owner(name)
        if model is None:
            loaded = ", ".join(self._models) or "none"
            raise ModelNotFoundError(f"model {name!r} is not loaded on this server; loaded models: {loaded}")
        if task is not None and model.task != task:
            serves, wanted = _TASK_WORDS[model.task], _TASK_WORDS[task]
            raise InvalidRequestError("model", f"model {name!r} serves {serves}, not {wanted}")
        return model

    async def load(self, config: ServerConfig) -> None:
        """Load every configured model (in a worker thread, so health checks keep answering), then mark ready."""
        if config.generate is not None:
            engine_config = server_engine_config(config.generate, embeds_here=config.embed is not None)
            started = time.perf_counter()
            engine = await asyncio.to_thread(load_engine, engine_config)
            await engine.start()
            loaded = engine.loaded
            took = time.perf_counter() - started
            chat = ChatFrontend(loaded.tokenizer, config.chat) if loaded.tokenizer is not None else None
            served = ServedModel(loaded, Tokenizer(loaded.tokenizer), generator=engine, chat=chat, load_duration_s=took)
            self.add(served)
        if config.embed is not None:
            started = time.perf_counter()
            loaded, embedder = await asyncio.to_thread(_load_embedder, config.embed)
            took = time.perf_counter() - started
            self.add(ServedModel(loaded, Tokenizer(loaded.tokenizer), embedder=embedder, load_duration_s=took))
        self.ready = True

    async def shutdown(self) -> None:
        """Stop the engines; requests still running are aborted."""
        self.ready = False
        for model in self.models():
            if model.generator is not None:
                await model.generator.shutdown()
            if model.embedder is not None:
                await model.embedder.shutdown()


def _load_embedder(config: ModelConfig) -> tuple[LoadedModel, EmbeddingEngine]:
    """An embedding model and its engine; blocking. Embeddings run in this process, so they bring torch into it."""
    from weir_server.engine.embedding_engine import EmbeddingEngine
    from weir_server.models.loader import load_model

    loaded = load_model(config, "embed")
    return loaded, EmbeddingEngine(loaded)
