"""Graceful drain: once begun, new InferenceService calls are refused with UNAVAILABLE while running ones finish."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc

from weir_server.api.interceptors import around, method_service, refusal

DRAINING_MESSAGE = "the server is shutting down; retry on another server"


class Drain(grpc.aio.ServerInterceptor):
    """Counts calls of the guarded services in flight; after `begin()` refuses new ones."""

    def __init__(self, services: frozenset[str]) -> None:
        self.services = services
        self.draining = False
        self.in_flight = 0
        self.refused = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._forced = asyncio.Event()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or method_service(details.method) not in self.services:
            return handler
        if self.draining:
            self.refused += 1
            return refusal(handler, grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        return around(handler, self._enter, self._leave)

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def begin(self) -> None:
        """Refuse every new call from now on."""
        self.draining = True

    def force(self) -> None:
        """Stop waiting for running calls (a second SIGTERM)."""
        self._forced.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call runs, up to `timeout_s` or a `force()`; True when none is left."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        # A call admitted just before begin() may not have started its behavior yet; give it a moment.
        await asyncio.sleep(min(0.05, timeout_s))
        while self.in_flight and not self._forced.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            idle, forced = asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._forced.wait())
            try:
                await asyncio.wait({idle, forced}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (idle, forced):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        return self.in_flight == 0
