"""POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter (vLLM's routes and bodies) over the LoadAdapter and
UnloadAdapter RPCs. Every serving backend gets the call, so any of them can take the adapter's requests; a backend
that fails is named in the error with its reason."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.backends import Backend, BackendPool
from weir_gateway.errors import ApiError, from_rpc_error, no_backend
from weir_gateway.schema import ObjectSchema, boolean, string
from weir_gateway.state import CONFIG, POOL, call_context
from weir_gateway.validation import Fields, read_json

BackendCall = Callable[[Backend], Awaitable[Any]]


@functools.lru_cache(maxsize=4)
def load_lora_request(strict: bool) -> ObjectSchema:
    """vLLM's body of /v1/load_lora_adapter."""
    return ObjectSchema(
        (
            string("lora_name", doc="the name requests pass as `model`"),
            string("lora_path", doc="the adapter's folder on the servers' file systems"),
            boolean("load_inplace", doc="replace an adapter of the same name instead of refusing (default false)"),
        ),
        required=("lora_name", "lora_path"),
        open=True,
        strict=strict,
    )


@functools.lru_cache(maxsize=4)
def unload_lora_request(strict: bool) -> ObjectSchema:
    """vLLM's body of /v1/unload_lora_adapter (its `lora_int_id` is not needed: names are unique)."""
    return ObjectSchema((string("lora_name"),), required=("lora_name",), open=True, strict=strict)


async def load_lora_adapter(request: web.Request) -> web.Response:
    """Load the adapter on every serving backend; 200 with vLLM's text once all of them have it."""
    body = load_lora_request(request.app[CONFIG].strict).read(Fields(await read_json(request)))
    name, path = body.value("lora_name"), body.value("lora_path")
    replace = body.value("load_inplace", False)
    ctx = call_context(request)

    async def load(backend: Backend) -> Any:
        if replace:
            try:
                await backend.stub.UnloadAdapter(
                    pb.UnloadAdapterRequest(name=name), metadata=ctx.metadata, timeout=ctx.timeout_s
                )
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        message = pb.LoadAdapterRequest(name=name, path=path)
        return await backend.stub.LoadAdapter(message, metadata=ctx.metadata, timeout=ctx.timeout_s)

    await _on_every_backend(request.app[POOL], load, f"loaded LoRA adapter '{name}'")
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    """Unload the adapter from every serving backend (its running requests finish first)."""
    body = unload_lora_request(request.app[CONFIG].strict).read(Fields(await read_json(request)))
    name = body.value("lora_name")
    ctx = call_context(request)

    async def unload(backend: Backend) -> Any:
        message = pb.UnloadAdapterRequest(name=name)
        return await backend.stub.UnloadAdapter(message, metadata=ctx.metadata, timeout=ctx.timeout_s)

    await _on_every_backend(request.app[POOL], unload, f"unloaded LoRA adapter '{name}'")
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def _on_every_backend(pool: BackendPool, call: BackendCall, done: str) -> None:
    """Run `call` on every serving backend at once, then re-read their model lists. A failure anywhere is an
    ApiError with the first failure's status, naming each failed backend (and those where it worked)."""
    backends = [b for b in pool.backends if b.available]
    if not backends:
        raise no_backend()
    results = await asyncio.gather(*(call(b) for b in backends), return_exceptions=True)
    await pool.refresh_models()
    failures: list[tuple[Backend, grpc.aio.AioRpcError]] = []
    for backend, result in zip(backends, results, strict=True):
        if isinstance(result, grpc.aio.AioRpcError):
            failures.append((backend, result))
        elif isinstance(result, BaseException):
            raise result
    if not failures:
        return
    first = from_rpc_error(failures[0][1])
    if len(backends) == 1:
        raise first
    reasons = "; ".join(f"backend {b.address}: {from_rpc_error(e).message}" for b, e in failures)
    worked = [b.address for b in backends if all(b is not f for f, _ in failures)]
    if worked:
        reasons += f" ({done} on {', '.join(worked)})"
    raise ApiError(first.status, reasons, param=first.param, code=first.code, retry_after_s=first.retry_after_s)
