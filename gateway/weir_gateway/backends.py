"""The Weir servers behind the gateway: one gRPC channel each, health watching, least-outstanding choice."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weir.v1 import inference_pb2, inference_pb2_grpc
from weir_client.security import channel_security
from weir_gateway.config import GatewayConfig
from weir_gateway.errors import ApiError, bad_request, no_backend
from weir_gateway.security import auth_interceptors

logger = logging.getLogger(__name__)

ModelTask = int  # inference_pb2.ModelTask value
T = TypeVar("T")
HEALTH_SERVICE = ""  # the server's overall health, which goes NOT_SERVING while it loads or drains
LIST_MODELS_TIMEOUT_S = 10.0
MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def balancing_options(address: str) -> list[tuple[str, str]]:
    """For a backend named as several servers (`dns:///headless-service:50051`, `ipv4:a:p,b:p`): calls spread
    round-robin over those whose grpc.health.v1 status is SERVING. A plain HOST:PORT keeps one connection."""
    if not address.startswith(MULTI_ADDRESS_SCHEMES):
        return []
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name},
    }
    return [("grpc.service_config", json.dumps(config))]


@dataclass(eq=False)
class Backend:
    """One Weir server: its channel, stubs, health and the requests the gateway has in flight on it."""

    address: str
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceStub
    health: Any  # a grpc_health HealthStub (typeshed's declares none of its methods)
    serving: bool = False
    models: tuple[inference_pb2.ModelInfo, ...] = ()
    outstanding: int = 0
    down_until: float = 0.0  # set when a call found the backend unreachable before its health stream did

    @property
    def available(self) -> bool:
        return self.serving and time.monotonic() >= self.down_until

    def has_model(self, model: str, task: ModelTask) -> bool:
        """Whether this backend serves `model` ("" = its default for `task`); unknown model lists say yes."""
        if not self.models:
            return True
        if model:
            return any(m.id == model and m.task in (task, inference_pb2.MODEL_TASK_UNSPECIFIED) for m in self.models)
        return any(m.is_default and m.task == task for m in self.models)


@dataclass
class BackendPool:
    """All backends, chosen by least outstanding requests among those whose health is SERVING."""

    config: GatewayConfig
    backends: list[Backend] = field(default_factory=list)
    _watchers: list[asyncio.Task[None]] = field(default_factory=list)
    _turn: Iterator[int] = field(default_factory=itertools.count)
    interceptors: Sequence[grpc.aio.ClientInterceptor] = ()  # e.g. tracing, outermost first

    async def start(self) -> None:
        """Open a channel per backend and start watching their health."""
        limit = self.config.max_message_bytes
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Pings notice a backend host that vanished without closing its connections (Weir servers accept
            # pings every 10 s or slower).
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        credentials, tls_options = channel_security(self.config.backend_tls, None)
        options += tls_options
        interceptors = [*self.interceptors, *(auth_interceptors(self.config.backend_api_key) or ())]
        for address in self.config.backends:
            options_for = [*options, *balancing_options(address)]
            if credentials is None:
                channel = grpc.aio.insecure_channel(address, options=options_for, interceptors=interceptors)
            else:
                channel = grpc.aio.secure_channel(address, credentials, options=options_for, interceptors=interceptors)
            backend = Backend(
                address,
                channel,
                inference_pb2_grpc.InferenceServiceStub(channel),
                health_pb2_grpc.HealthStub(channel),
            )
            self.backends.append(backend)
            self._watchers.append(asyncio.create_task(self._watch(backend), name=f"health:{address}"))

    async def close(self) -> None:
        """Stop the watchers and close every channel (in-flight calls are cancelled)."""
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(b.channel.close() for b in self.backends), return_exceptions=True)

    async def wait_serving(self, timeout_s: float) -> bool:
        """Wait until at least one backend is SERVING (used at start-up and by tests)."""
        deadline = time.monotonic() + timeout_s
        while not any(b.available for b in self.backends):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def choose(self, model: str, task: ModelTask, exclude: frozenset[Backend] = frozenset()) -> Backend:
        """The available backend serving `model` with the fewest requests in flight (ties rotate)."""
        available = [b for b in self.backends if b.available and b not in exclude]
        if not available:
            raise no_backend()
        candidates = [b for b in available if b.has_model(model, task)]
        if not candidates:
            if any(info.id == model for b in available for info in b.models):
                task_name = inference_pb2.ModelTask.Name(task).removeprefix("MODEL_TASK_").lower()
                raise bad_request("model", f"The model `{model}` cannot be used for this endpoint (task {task_name}).")
            if model:
                raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
            raise ApiError(404, "no backend has a default model for this endpoint; pass `model`", param="model")
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda b: b.outstanding)

    @contextlib.contextmanager
    def lease(self, backend: Backend) -> Iterator[Backend]:
        """Count a request as outstanding on `backend` while the block runs."""
        backend.outstanding += 1
        try:
            yield backend
        finally:
            backend.outstanding -= 1

    async def unary(
        self, model: str, task: ModelTask, invoke: Callable[[inference_pb2_grpc.InferenceServiceStub], Awaitable[T]]
    ) -> T:
        """Run one unary call on a chosen backend, moving to another if it turns out unreachable."""
        tried: set[Backend] = set()
        while True:
            backend = self.choose(model, task, frozenset(tried))
            with self.lease(backend):
                try:
                    return await invoke(backend.stub)
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
            self.mark_unreachable(backend)
            tried.add(backend)

    def context_length(self, model: str, task: ModelTask) -> int | None:
        """The context length of `model` ("" = the default for `task`) as the backends report it."""
        for info in self.models():
            if (info.id == model if model else info.is_default and info.task == task) and info.max_context_length:
                return info.max_context_length
        return None

    def mark_unreachable(self, backend: Backend) -> None:
        """A call could not reach `backend`: skip it until its health is confirmed again or a pause passes."""
        logger.warning("backend %s unreachable; routing around it", backend.address)
        backend.down_until = time.monotonic() + self.config.health_retry_s

    def models(self) -> list[inference_pb2.ModelInfo]:
        """Every model of the available backends, each id once."""
        seen: dict[str, inference_pb2.ModelInfo] = {}
        for backend in self.backends:
            if backend.available:
                for info in backend.models:
                    seen.setdefault(info.id, info)
        return list(seen.values())

    async def _watch(self, backend: Backend) -> None:
        """Follow the backend's health stream for ever, re-opening it after the backend goes away."""
        while True:
            try:
                await self._follow_health(backend)
            except grpc.aio.AioRpcError as e:
                if backend.serving:
                    logger.warning("backend %s lost: %s", backend.address, e.code().name)
                else:
                    logger.debug("backend %s not reachable: %s", backend.address, e.code().name)
            self._set_serving(backend, False)
            await asyncio.sleep(self.config.health_retry_s)

    async def _follow_health(self, backend: Backend) -> None:
        request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
        try:
            async for reply in backend.health.Watch(request):
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                if serving and not backend.serving:
                    await self._refresh_models(backend)
                self._set_serving(backend, serving)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            await self._poll_health(backend, request)  # servers without Watch: poll Check instead

    async def _poll_health(self, backend: Backend, request: health_pb2.HealthCheckRequest) -> None:
        while True:
            reply = await backend.health.Check(request, timeout=self.config.health_retry_s * 5)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            if serving and not backend.serving:
                await self._refresh_models(backend)
            self._set_serving(backend, serving)
            await asyncio.sleep(self.config.health_retry_s)

    async def _refresh_models(self, backend: Backend) -> None:
        try:
            reply = await backend.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=LIST_MODELS_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            logger.warning("ListModels on %s failed (%s); routing to it without a model list", backend.address, e)
            backend.models = ()
            return
        backend.models = tuple(reply.models)

    def _set_serving(self, backend: Backend, serving: bool) -> None:
        if serving != backend.serving:
            logger.info("backend %s is %s", backend.address, "SERVING" if serving else "NOT_SERVING")
            backend.serving = serving
        if serving:
            backend.down_until = 0.0
