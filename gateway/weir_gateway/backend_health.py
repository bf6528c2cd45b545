"""A backend's grpc.health.v1 status as the gateway follows it: a Watch stream for ever (Check polls for servers
without Watch), the model list read when it turns SERVING, and the probe that readmits an ejected backend."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from weir.v1 import inference_pb2

if TYPE_CHECKING:
    from weir_gateway.backends import Backend

logger = logging.getLogger("weir_gateway.backends")

HEALTH_SERVICE = ""  # the server's overall health, which goes NOT_SERVING while it loads or drains
LIST_MODELS_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 5.0


async def watch_health(backend: Backend, retry_s: float) -> None:
    """Follow the backend's health stream for ever, re-opening it `retry_s` after the backend goes away."""
    while True:
        try:
            await _follow_health(backend, retry_s)
        except grpc.aio.AioRpcError as e:
            if backend.serving:
                logger.warning("backend %s lost: %s", backend.address, e.code().name)
            else:
                logger.debug("backend %s not reachable: %s", backend.address, e.code().name)
        set_serving(backend, False)
        await asyncio.sleep(retry_s)


async def readmit_when_serving(backend: Backend, cooldown_s: float, retry_s: float) -> None:
    """After `cooldown_s`, readmit an ejected backend once a health Check says SERVING (every `retry_s` till then)."""
    await asyncio.sleep(cooldown_s)
    request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
    while True:
        try:
            reply = await backend.health.Check(request, timeout=PROBE_TIMEOUT_S)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                logger.info("backend %s passed its health probe; readmitted", backend.address)
                backend.ejected, backend.failures, backend.down_until = False, 0, 0.0
                return
        except grpc.aio.AioRpcError as e:
            logger.debug("health probe of ejected backend %s: %s", backend.address, e.code().name)
        await asyncio.sleep(retry_s)


def set_serving(backend: Backend, serving: bool) -> None:
    if serving != backend.serving:
        logger.info("backend %s is %s", backend.address, "SERVING" if serving else "NOT_SERVING")
        backend.serving = serving
    if serving:
        backend.down_until = 0.0


async def _follow_health(backend: Backend, retry_s: float) -> None:
    request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
    try:
        async for reply in backend.health.Watch(request):
            await _observe(backend, reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        while True:  # servers without Watch: poll Check instead
            reply = await backend.health.Check(request, timeout=retry_s * 5)
            await _observe(backend, reply.status == health_pb2.HealthCheckResponse.SERVING)
            await asyncio.sleep(retry_s)


async def _observe(backend: Backend, serving: bool) -> None:
    if serving and not backend.serving:
        await refresh_models(backend)
    set_serving(backend, serving)


async def refresh_models(backend: Backend) -> None:
    """Re-read the backend's model list (its LoRA adapters included); on failure, route to it without one."""
    try:
        reply = await backend.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=LIST_MODELS_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        logger.warning("ListModels on %s failed (%s); routing to it without a model list", backend.address, e)
        backend.models = ()
        return
    backend.models = tuple(reply.models)
