"""The LoRA adapter RPCs of weir.v1.InferenceService (LoadAdapter, UnloadAdapter, ListAdapters) and the adapter
entries of ListModels: checks at the edge, the engine does the loading."""

from __future__ import annotations

from weir.v1 import inference_pb2 as pb
from weir_server.api.errors import AdapterNotFoundError, AlreadyExistsError, FailedPreconditionError
from weir_server.api.model_registry import ENABLE_LORA_HINT, ServedModel, ServedModels
from weir_server.engine.types import AdapterInfo
from weir_server.errors import InvalidRequestError
from weir_server.preflight import VALID_ADAPTER_NAME, adapter_folder_problem


async def load_adapter(registry: ServedModels, request: pb.LoadAdapterRequest) -> pb.LoadAdapterResponse:
    """Load the adapter at `request.path` onto the request's generation model as `request.name`."""
    if not VALID_ADAPTER_NAME.fullmatch(request.name):
        raise InvalidRequestError("name", "must be 1 to 128 printable ASCII characters without spaces or commas")
    if not request.path:
        raise InvalidRequestError("path", "must name the adapter's directory (adapter_config.json and weights)")
    model = registry.get(request.model, "generate")
    if model.generator is None or not model.lora_enabled:
        raise FailedPreconditionError(f"model {model.id!r} serves no LoRA adapters; {ENABLE_LORA_HINT}")
    if registry.find(request.name) is not None:
        raise AlreadyExistsError("name", f"{request.name!r} is the id of a served model; give the adapter another")
    owner = registry.adapter_owner(request.name)
    if owner is not None:
        raise AlreadyExistsError(
            "name", f"LoRA adapter {request.name!r} is already loaded on model {owner.id!r}; unload it first"
        )
    problem = adapter_folder_problem(request.path)  # the server's own file system
    if problem is not None:
        raise InvalidRequestError("path", f"{request.path}: {problem}")
    info = await model.generator.load_adapter(request.name, request.path)
    return pb.LoadAdapterResponse(adapter=adapter_info(info, model))


async def unload_adapter(registry: ServedModels, request: pb.UnloadAdapterRequest) -> pb.UnloadAdapterResponse:
    """Remove the adapter `request.name`; requests using it finish first (the engine's promise)."""
    if not request.name:
        raise InvalidRequestError("name", "must name a loaded LoRA adapter")
    generation = [m for m in registry.models() if m.generator is not None]
    if generation and not any(m.lora_enabled for m in generation):
        raise FailedPreconditionError(f"this server serves no LoRA adapters; {ENABLE_LORA_HINT}")
    owner = registry.adapter_owner(request.name)
    if owner is None or owner.generator is None:
        loaded = ", ".join(a.name for m in generation for a in m.adapters()) or "none"
        raise AdapterNotFoundError("name", f"LoRA adapter {request.name!r} is not loaded; loaded adapters: {loaded}")
    await owner.generator.unload_adapter(request.name)
    return pb.UnloadAdapterResponse()


def list_adapters(registry: ServedModels, request: pb.ListAdaptersRequest) -> pb.ListAdaptersResponse:
    """The adapters of the named generation model, or of every one (none where LoRA is off)."""
    models = [registry.get(request.model, "generate")] if request.model else registry.models()
    return pb.ListAdaptersResponse(adapters=[adapter_info(a, m) for m in models for a in m.adapters()])


def adapter_info(info: AdapterInfo, model: ServedModel) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=info.name,
        path=str(info.path),
        base_model=model.id,
        rank=info.rank,
        alpha=float(info.alpha),
        target_modules=list(info.target_modules),
    )


def adapter_model_infos(model: ServedModel, base: pb.ModelInfo) -> list[pb.ModelInfo]:
    """ListModels' entries for the adapters of `model` (whose own entry is `base`): their base model as parent."""
    entries = []
    for info in model.adapters():
        entry = pb.ModelInfo()
        entry.CopyFrom(base)
        entry.id, entry.is_default, entry.parent, entry.root = info.name, False, model.id, str(info.path)
        entries.append(entry)
    return entries
