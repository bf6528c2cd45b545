"""EngineLoop: drives `LLMEngine.step()` until stopped, taking requests and aborts from other threads.

The loop is the same wherever it runs: on a thread of the server process (`AsyncEngine`) or as the main loop
of an engine-core process (`engine_core`). Only where the outputs go differs: `deliver` decides.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from weir_server.engine.llm_engine import LLMEngine
from weir_server.engine.stats import EngineStats
from weir_server.engine.types import GenerationOutput, GenerationRequest

logger = logging.getLogger(__name__)

_GIL_SWITCH_INTERVAL_S = 0.0005

Deliver = Callable[[list[GenerationOutput], EngineStats], None]


class EngineLoop:
    """Steps the engine while it has work and sleeps otherwise; thread-safe `add`, `abort` and `stop`."""

    def __init__(self, engine: LLMEngine, deliver: Deliver) -> None:
        self.engine = engine
        self._deliver = deliver
        self._wakeup = threading.Condition()
        self._pending: list[GenerationRequest] = []  # admitted elsewhere, added on the loop's thread
        self._aborts: list[str] = []
        self._stopping = False
        self.last_stats = engine.stats()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def add(self, request: GenerationRequest, check_capacity: bool = True) -> None:
        """Queue a validated request; raises QueueFullError when the scheduler's waiting queue is full."""
        with self._wakeup:
            if check_capacity:
                self.engine.scheduler.check_capacity(len(self._pending))
            self._pending.append(request)
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        with self._wakeup:
            self._aborts.append(request_id)
            self._wakeup.notify()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    def run(self) -> None:
        """Step until `stop()`; the requests still in flight then are left to the caller."""
        # The loop drops the GIL while it waits for the GPU and must get it back at once, not after another
        # thread's 5 ms default slice: measured on an H100 at 512 streams, 0.5 ms gave +17% tokens/s.
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        engine = self.engine
        while True:
            with self._wakeup:
                # Sleep while idle: no polling; add, abort and stop notify.
                while not (self._stopping or self._pending or self._aborts or engine.has_unfinished()):
                    self._wakeup.wait()
                if self._stopping:
                    break
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
            outputs: list[GenerationOutput] = []
            try:
                for request in pending:
                    engine.add_request(request)
                for request_id in aborts:
                    engine.abort_request(request_id)
                if engine.has_unfinished():
                    outputs = engine.step()
            except Exception as error:  # a bug outside the model step must not kill the loop
                logger.exception("engine loop failed; failing every request in flight")
                outputs = self._fail_all(f"{type(error).__name__}: {error}")
            self.last_stats = engine.stats()
            if outputs:
                self._deliver(outputs, self.last_stats)
        self.last_stats = engine.stats()

    def _fail_all(self, message: str) -> list[GenerationOutput]:
        scheduler = self.engine.scheduler
        request_ids = [s.request_id for s in [*scheduler.running, *scheduler.waiting]]
        return self.engine.fail_requests(request_ids, message)
