"""GET /v1/models and GET /v1/models/{id}: the models of the backends that are serving."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_client.tasks import task_name
from weir_gateway.errors import ApiError, no_backend
from weir_gateway.state import POOL


def model_card(info: pb.ModelInfo, created: int) -> dict[str, Any]:
    """An OpenAI model object, with vLLM's `max_model_len` and Weir's task; a LoRA adapter's `parent` is its base
    model and its `root` the folder it was loaded from (as vLLM's)."""
    return {
        "id": info.id,
        "object": "model",
        "created": created,
        "owned_by": "weir",
        "root": info.root or info.id,
        "parent": info.parent or None,
        "max_model_len": info.max_context_length,
        "task": task_name(info.task),
    }


def _models(request: web.Request) -> list[pb.ModelInfo]:
    pool = request.app[POOL]
    if not any(b.available for b in pool.backends):
        raise no_backend()
    return pool.models()


async def list_models(request: web.Request) -> web.Response:
    created = int(time.time())
    return web.json_response({"object": "list", "data": [model_card(m, created) for m in _models(request)]})


async def retrieve_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    for info in _models(request):
        if info.id == model_id:
            return web.json_response(model_card(info, int(time.time())))
    raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
