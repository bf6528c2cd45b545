"""The grpc.aio server: InferenceService, ControlService, grpc.health.v1 and reflection on one port; drains on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weir.v1 import inference_pb2, inference_pb2_grpc
from weir_server.api.control import ControlServicer, RunningRequests
from weir_server.api.decoding import DecodeErrorInterceptor
from weir_server.api.drain import Drain
from weir_server.api.model_registry import ServedModels
from weir_server.api.observer import Observability
from weir_server.api.security import ApiKeyInterceptor, server_credentials
from weir_server.api.servicer import InferenceServicer
from weir_server.config import ServerConfig
from weir_server.errors import EngineUnavailableError
from weir_server.metrics import MetricsHttpServer, create_metrics, metrics_api_keys
from weir_server.process_lifetime import freeze_startup_objects
from weir_server.telemetry import create_tracing

logger = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# Not drained: routers poll load (and see `draining`) and abort requests until the server stops.
CONTROL_SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name
_HEALTH_NAMES = ("", SERVICE_NAME)
_STATUS_FLUSH_S = 2.0


class WeirServer:
    """One gRPC server and the models behind it. `start()` listens first, then loads, then reports SERVING."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = ServedModels()
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self.drain = Drain(frozenset({SERVICE_NAME}))
        self.engine_failure: asyncio.Future[str] | None = None  # set when a generation engine dies for good
        interceptors: list[grpc.aio.ServerInterceptor] = [self.drain, DecodeErrorInterceptor()]
        if config.api_keys:
            interceptors.insert(0, ApiKeyInterceptor(config.api_keys))  # an unauthenticated call is not counted
        observe = config.observability
        metrics = create_metrics(self.registry) if observe.metrics_port is not None else None
        self.observability = Observability(metrics, create_tracing(observe))
        self.metrics_server: MetricsHttpServer | None = None
        interceptors[:0] = self.observability.interceptors()  # outermost: refused calls are counted too
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        running = RunningRequests()
        self.servicer = InferenceServicer(
            self.registry, self.observability, config.limits, config.parse_special_tokens, running
        )
        self.control = ControlServicer(self.registry, running, lambda: self.drain.draining)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, self.server)
        inference_pb2_grpc.add_ControlServiceServicer_to_server(self.control, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = (SERVICE_NAME, CONTROL_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.server)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self, freeze_loaded: bool = False) -> None:
        """Listen (port 0 picks a free one), load the models, then report SERVING.

        `freeze_loaded`: the process is this server's own (`weir serve`), so what loading created stays until it
        exits and is moved out of the garbage collector's reach first (`freeze_startup_objects`).
        """
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, server_credentials(self.config.tls))
        except RuntimeError as e:  # grpc raises RuntimeError when the bind fails
            raise OSError(f"cannot listen on {address}: is the port in use?") from e
        await self.server.start()
        if self.observability.metrics is not None:
            port = self.config.observability.metrics_port or 0
            keys = metrics_api_keys(self.config)
            self.metrics_server = MetricsHttpServer(self.observability.metrics, self.config.host, port, keys)
        scheme = "plaintext" if self.config.tls is None else "mutual TLS" if self.config.tls.client_ca_file else "TLS"
        logger.info("listening on %s (%s); loading models", self.address, scheme)
        self.engine_failure = asyncio.get_running_loop().create_future()
        await self.registry.load(self.config)
        for model in self.registry.models():
            if model.generator is not None:
                model.generator.on_death = self._engine_died
        if freeze_loaded:
            freeze_startup_objects()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        names = ", ".join(f"{m.id} ({m.task})" for m in self.registry.models()) or "none"
        adapters = [a.name for m in self.registry.models() for a in m.adapters()]
        if adapters:
            names += f" with LoRA adapters {', '.join(adapters)}"
        logger.info("Weir is ready on %s serving %s", self.address, names)

    def _engine_died(self, message: str) -> None:
        """An engine process ended on its own (any thread): report NOT_SERVING; `serve` then stops with exit 1."""
        future = self.engine_failure
        if future is None:
            return

        def fail() -> None:
            if not future.done():
                future.set_result(message)
            asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

        future.get_loop().call_soon_threadsafe(fail)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING and refuse new calls (UNAVAILABLE), let running calls finish for `grace` seconds,
        then stop the engines (calls still running end with UNAVAILABLE) and the server."""
        grace = self.config.drain_timeout_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.drain.begin()
        if self.registry.ready:
            logger.info("draining: %d calls running, waiting up to %.0fs", self.drain.in_flight, grace)
        idle = await self.drain.wait_idle(grace)
        if not idle:
            logger.warning("drain ended with %d calls still running; they end with UNAVAILABLE", self.drain.in_flight)
        await self.registry.shutdown()
        self.servicer.shutdown()
        await self.server.stop(_STATUS_FLUSH_S)  # lets the aborted calls send their status
        self._stop_observability()
        if self.port is not None:
            logger.info("stopped (%d calls refused while draining)", self.drain.refused)

    def force_stop(self) -> None:
        """End the drain now (a second SIGTERM or SIGINT)."""
        self.drain.force()

    def _stop_observability(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.observability.tracing is not None:
            self.observability.tracing.shutdown()  # flushes the spans still buffered

    @property
    def metrics_port(self) -> int | None:
        """The port serving /metrics once started (None when metrics are off)."""
        return self.metrics_server.port if self.metrics_server is not None else None

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in _HEALTH_NAMES:
            await self.health.set(name, status)


async def serve_async(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then drain and stop."""
    server = WeirServer(config)
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            logger.warning("second stop signal: not waiting for running calls")
            server.force_stop()
        stopping.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    start = asyncio.ensure_future(server.start(freeze_loaded=True))
    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()  # raises if loading failed
            assert server.engine_failure is not None
            done, _ = await asyncio.wait({stop_wait, server.engine_failure}, return_when=asyncio.FIRST_COMPLETED)
            if server.engine_failure in done:
                raise EngineUnavailableError(f"the generation engine stopped: {server.engine_failure.result()}")
        else:
            logger.info("stop requested while loading")
            start.cancel()
    finally:
        stop_wait.cancel()
        await server.stop()


def serve(config: ServerConfig) -> None:
    """Blocking entry point of `weir serve`."""
    asyncio.run(serve_async(config))
