"""The Weir servers behind the gateway: one gRPC channel each, health watching, the routing policy's choice,
retries before the first byte, ejection of failing backends, and dns:/// names re-resolved as servers come and go."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from weir.v1 import inference_pb2, inference_pb2_grpc
from weir_client.security import channel_security
from weir_gateway.backend_health import readmit_when_serving, refresh_models, watch_health
from weir_gateway.config import GatewayConfig
from weir_gateway.errors import ApiError, bad_request, no_backend
from weir_gateway.resolver import Resolver, dns_target, system_resolver
from weir_gateway.routing import RoutingPolicy, create_policy
from weir_gateway.security import auth_interceptors
from weir_gateway.server_load import poll_load

logger = logging.getLogger(__name__)

ModelTask = int  # inference_pb2.ModelTask value
T = TypeVar("T")
MULTI_ADDRESS_SCHEMES = ("ipv4:", "ipv6:")  # dns: names are resolved by the pool itself, one Backend per address
# Failures before any output that another backend may not share: the backend is gone, or its queue is full.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A model no backend lists may be a LoRA adapter loaded on a server directly (not through this gateway): its name
# makes the gateway re-read the model lists, at most this often.
UNKNOWN_MODEL_REFRESH_S = 1.0


def balancing_options(address: str) -> list[tuple[str, str]]:
    """For a backend named as several servers (`ipv4:a:p,b:p`): calls spread round-robin over those whose
    grpc.health.v1 status is SERVING. A plain HOST:PORT keeps one connection."""
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
    name: str = ""  # the --backend it came from (a dns:/// name stands for several backends)
    serving: bool = False
    models: tuple[inference_pb2.ModelInfo, ...] = ()
    outstanding: int = 0  # calls this gateway has in flight on it
    reported_load: int = 0  # requests running + waiting on the server, as its last GetLoad said (all gateways')
    down_until: float = 0.0  # set when a call found the backend unreachable before its health stream did
    failures: int = 0  # consecutive calls that found it UNAVAILABLE
    ejected: bool = False  # too many failures: no requests until a health probe after the cooldown says SERVING
    draining: bool = False  # its address left the DNS answer: no new requests; in-flight ones finish

    @property
    def load(self) -> int:
        """What routing weighs: the gateway's own calls, or the server's count when other gateways add to it."""
        return max(self.outstanding, self.reported_load)

    @property
    def available(self) -> bool:
        return self.serving and not (self.ejected or self.draining) and time.monotonic() >= self.down_until

    def has_model(self, model: str, task: ModelTask) -> bool:
        """Whether this backend serves `model` ("" = its default for `task`); unknown model lists say yes."""
        if not self.models:
            return True
        if model:
            return any(m.id == model and m.task in (task, inference_pb2.MODEL_TASK_UNSPECIFIED) for m in self.models)
        return any(m.is_default and m.task == task for m in self.models)


@dataclass
class BackendPool:
    """All backends, chosen by the routing policy among those whose health is SERVING."""

    config: GatewayConfig
    backends: list[Backend] = field(default_factory=list)
    interceptors: Sequence[grpc.aio.ClientInterceptor] = ()  # e.g. tracing, outermost first
    resolver: Resolver = system_resolver  # how dns:/// backends are resolved (tests pass their own)
    policy: RoutingPolicy = field(init=False)
    _watchers: dict[Backend, asyncio.Task[None]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)  # probes, retirements, the resolve loop
    _models_refreshed: float = float("-inf")  # when an unknown model last made the pool re-read model lists

    def __post_init__(self) -> None:
        c = self.config
        self.policy = create_policy(c.routing, c.routing_imbalance, c.routing_imbalance_requests)

    async def start(self) -> None:
        """Open a channel per backend (per address of a dns:/// name) and start watching their health."""
        for address in self.config.backends:
            if dns_target(address) is None:
                self._add(address, address)
            else:
                await self.resolve(address)
        if any(dns_target(address) for address in self.config.backends):
            self._spawn(self._resolve_forever(), "resolve")

    async def close(self) -> None:
        """Stop the watchers and close every channel (in-flight calls are cancelled)."""
        tasks = [*self._watchers.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(b.channel.close() for b in self.backends), return_exceptions=True)

    def _add(self, address: str, name: str) -> Backend:
        limit = self.config.max_message_bytes
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Pings notice a backend host that vanished without closing its connections (Weir servers accept
            # pings every 10 s or slower).
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            *balancing_options(address),
        ]
        tls = self.config.backend_tls
        credentials, tls_options = channel_security(tls, None)
        options += tls_options
        target = dns_target(name)
        if tls is not None and target is not None and not tls.server_name:
            options.append(("grpc.ssl_target_name_override", target[0]))  # certificates name the service, not IPs
        interceptors = [*self.interceptors, *(auth_interceptors(self.config.backend_api_key) or ())]
        if credentials is None:
            channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        else:
            channel = grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
        backend = Backend(
            address,
            channel,
            inference_pb2_grpc.InferenceServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            name,
        )
        self.backends.append(backend)
        watch = watch_health(backend, self.config.health_retry_s)
        self._watchers[backend] = asyncio.create_task(watch, name=f"health:{address}")
        if self.config.load_poll_s:
            self._spawn(self._poll_load(backend), f"load:{address}")
        return backend

    async def _poll_load(self, backend: Backend) -> None:
        def report(load: int) -> None:
            backend.reported_load = load

        await poll_load(backend.channel, backend.address, self.config.load_poll_s, report)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_serving(self, timeout_s: float) -> bool:
        """Wait until at least one backend is SERVING (used at start-up and by tests)."""
        deadline = time.monotonic() + timeout_s
        while not any(b.available for b in self.backends):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def choose(
        self, model: str, task: ModelTask, exclude: frozenset[Backend] = frozenset(), key: bytes | None = None
    ) -> Backend:
        """The routing policy's pick among the available backends serving `model`; `key` is the prompt prefix's
        hash (routing.prefix_key) when the request has one."""
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
        return self.policy.choose(candidates, key)

    async def refresh_models(self) -> None:
        """Re-read every available backend's model list (after loading or unloading an adapter)."""
        self._models_refreshed = time.monotonic()
        await asyncio.gather(*(refresh_models(b) for b in self.backends if b.available))

    async def look_for(self, model: str, task: ModelTask) -> None:
        """Before routing a request for `model`: when no available backend lists it, re-read their lists (at most
        every UNKNOWN_MODEL_REFRESH_S), as it may be an adapter loaded on a server directly."""
        if not model or any(b.available and b.has_model(model, task) for b in self.backends):
            return
        if time.monotonic() - self._models_refreshed >= UNKNOWN_MODEL_REFRESH_S:
            await self.refresh_models()

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
        """Run one unary call on a chosen backend, retried on another while it fails as `retry_elsewhere` allows."""
        tried: set[Backend] = set()
        await self.look_for(model, task)
        while True:
            backend = self.choose(model, task, frozenset(tried))
            with self.lease(backend):
                try:
                    result = await invoke(backend.stub)
                except grpc.aio.AioRpcError as e:
                    self.record_failure(backend, e)
                    tried.add(backend)
                    if not self.retry_elsewhere(e, model, task, tried):
                        raise
                else:
                    self.record_success(backend)
                    return result
            await self.backoff(len(tried))

    def retry_elsewhere(self, error: grpc.aio.AioRpcError, model: str, task: ModelTask, tried: set[Backend]) -> bool:
        """Whether a call that failed with `error` before any output goes to another backend: the failure is one
        another backend may not share, attempts remain, and an untried backend serves the model."""
        return (
            error.code() in RETRYABLE
            and len(tried) < self.config.max_attempts
            and any(b.available and b not in tried and b.has_model(model, task) for b in self.backends)
        )

    async def backoff(self, retry: int) -> None:
        """Wait before retry number `retry` (1, 2, ...): full jitter, so retries after a shared failure spread."""
        await asyncio.sleep(random.uniform(0, self.config.retry_backoff_s * 2 ** (retry - 1)))

    def record_success(self, backend: Backend) -> None:
        backend.failures = 0

    def record_failure(self, backend: Backend, error: grpc.aio.AioRpcError) -> None:
        """A call on `backend` failed: UNAVAILABLE counts towards ejection (RESOURCE_EXHAUSTED is load, not a
        fault, and other codes are the request's own)."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.mark_unreachable(backend)

    def context_length(self, model: str, task: ModelTask) -> int | None:
        """The context length of `model` ("" = the default for `task`) as the backends report it."""
        for info in self.models():
            if (info.id == model if model else info.is_default and info.task == task) and info.max_context_length:
                return info.max_context_length
        return None

    def mark_unreachable(self, backend: Backend) -> None:
        """A call could not reach `backend`: skip it until its health is confirmed again or a pause passes, and
        after `eject_after` such calls in a row, eject it for `eject_s` (a circuit breaker)."""
        logger.warning("backend %s unreachable; routing around it", backend.address)
        backend.down_until = time.monotonic() + self.config.health_retry_s
        backend.failures += 1
        if self.config.eject_after and backend.failures >= self.config.eject_after and not backend.ejected:
            logger.warning(
                "backend %s ejected for %gs after %d failures", backend.address, self.config.eject_s, backend.failures
            )
            backend.ejected = True
            self._spawn(
                readmit_when_serving(backend, self.config.eject_s, self.config.health_retry_s),
                f"probe:{backend.address}",
            )

    async def resolve(self, name: str) -> None:
        """Resolve the dns:/// backend `name` now: open backends for new addresses, drain those that left (they
        take no new requests and close once their in-flight ones finish). A failed lookup changes nothing."""
        target = dns_target(name)
        assert target is not None
        try:
            addresses = set(await self.resolver(*target))
        except OSError as e:
            logger.warning(
                "cannot resolve backend %s (%s); keeping its %d addresses",
                name,
                e,
                sum(b.name == name and not b.draining for b in self.backends),
            )
            return
        mine = {b.address: b for b in self.backends if b.name == name}
        for address in sorted(addresses - mine.keys()):
            logger.info("backend %s: new address %s", name, address)
            self._add(address, name)
        for address, backend in mine.items():
            if address in addresses and backend.draining:
                logger.info("backend %s: address %s is back", name, address)
                backend.draining = False
            elif address not in addresses and not backend.draining:
                logger.info("backend %s: address %s left; draining it", name, address)
                backend.draining = True
                self._spawn(self._retire(backend), f"retire:{address}")

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resolve_interval_s)
            for name in self.config.backends:
                if dns_target(name) is not None:
                    await self.resolve(name)

    async def _retire(self, backend: Backend) -> None:
        """Close a draining backend once its in-flight requests are done (unless its address came back)."""
        while backend.outstanding and backend.draining:
            await asyncio.sleep(0.05)
        if not backend.draining:
            return
        self.backends.remove(backend)
        watcher = self._watchers.pop(backend)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await backend.channel.close()  # its load poller ends with the channel
        logger.info("backend %s retired", backend.address)

    def models(self) -> list[inference_pb2.ModelInfo]:
        """Every model of the available backends, each id once."""
        seen: dict[str, inference_pb2.ModelInfo] = {}
        for backend in self.backends:
            if backend.available:
                for info in backend.models:
                    seen.setdefault(info.id, info)
        return list(seen.values())
