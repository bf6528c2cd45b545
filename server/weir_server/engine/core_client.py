"""CoreClient: how the AsyncEngine reaches its EngineCore, on a thread of this process or in a process of its own.

Either way the core steps in a `CoreLoop`, and each step's outputs come back through `deliver`, called on a thread
of the client's (never the event loop), which hands them to the streams. This module imports neither the core nor
torch: a server process whose core has a process of its own never loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Protocol

from weir_server.config import EngineConfig
from weir_server.engine.core_process import run_core_process
from weir_server.engine.kv_events import KvEvent
from weir_server.engine.scheduler import check_in_flight
from weir_server.engine.stats import EngineStats
from weir_server.engine.types import AdapterInfo, GenerationOutput, GenerationRequest
from weir_server.engine.wire import (
    AbortRequest,
    AdapterReply,
    AddRequest,
    CoreFailed,
    CoreInfo,
    CoreOutputs,
    CoreReady,
    FromCore,
    LoadAdapter,
    StopCore,
    ToCore,
    UnloadAdapter,
    decode_kv_events,
    decode_outputs,
)
from weir_server.errors import EngineUnavailableError, ModelLoadError

if TYPE_CHECKING:
    from weir_server.engine.core import CoreLoop, EngineCore

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 1800.0  # loading a large checkpoint and capturing CUDA graphs can take minutes

Deliver = Callable[[list[GenerationOutput], list[KvEvent]], None]  # a step's outputs and prefix-cache events
OnExit = Callable[[str], None]  # the core ended on its own and will not come back: why


class CoreClient(Protocol):
    """Start, stop, add, abort and stats of one EngineCore, wherever it runs."""

    @property
    def is_running(self) -> bool: ...

    async def start(self, deliver: Deliver, on_exit: OnExit) -> CoreInfo:
        """Start the core (loading its model where that is left to it); raises ModelLoadError if it can't."""
        ...

    async def stop(self) -> None:
        """Stop the core; the requests still in it are dropped."""
        ...

    def add(self, request: GenerationRequest, num_open: int) -> None:
        """Hand a validated request to the core; raises QueueFullError when the core can take no more (a client
        that cannot see the core's queue counts the `num_open` requests admitted before and not yet ended)."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats:
        """The core's counters as of its last step."""
        ...

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Read a LoRA adapter and serve it as `name`; raises InvalidRequestError naming the problem."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter (its requests in flight finish); raises NotFoundError for an unknown one."""
        ...


class InProcessClient:
    """The core's loop on a thread of this process; the core is built before (a model with weights)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.busy_loop: CoreLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self, deliver: Deliver, on_exit: OnExit) -> CoreInfo:
        """Start the loop's thread. The thread never ends on its own (`on_exit` is not called)."""
        from weir_server.engine.core import CoreLoop  # loaded with the core this client was given

        self.busy_loop = CoreLoop(self.core, lambda outputs, _stats, events: deliver(outputs, events))
        self._thread = threading.Thread(target=self.busy_loop.run, name="weir-engine", daemon=True)
        self._thread.start()
        return CoreInfo(self.core.max_seq_len, self.busy_loop.last_stats, tuple(self.core.adapters()))

    async def stop(self) -> None:
        if self.busy_loop is not None:
            self.busy_loop.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def add(self, request: GenerationRequest, num_open: int) -> None:
        self._loop().add(request)  # counts the core's own queue

    def abort(self, request_id: str) -> None:
        self._loop().abort(request_id)

    def stats(self) -> EngineStats:
        return self._loop().last_stats if self.busy_loop is not None else self.core.stats()

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        adapter = await asyncio.to_thread(self.core.read_adapter, name, path)  # file reads off the loop's thread
        info: AdapterInfo = await asyncio.wrap_future(self._loop().call(lambda core: core.add_adapter(adapter)))
        return info

    async def unload_adapter(self, name: str) -> None:
        await asyncio.wrap_future(self._loop().call(lambda core: core.remove_adapter(name)))

    def _loop(self) -> CoreLoop:
        if self.busy_loop is None:
            raise EngineUnavailableError("the engine is not running")
        return self.busy_loop


class ProcessClient:
    """The server side of a core process (`core_process.run_core_process`): one pipe, a reader thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self._stats = EngineStats(0, 0, 0, 0, config.cache.block_size, 0, 0, 0, 0, 0)
        self._call_ids = itertools.count()
        # Adapter calls awaiting the core's reply: call id -> (the caller's event loop, its future).
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[AdapterReply]]] = {}
        self._launched: CoreInfo | None = None  # a core launched and not started yet

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.is_alive() and self._reader is not None

    def launch(self) -> CoreInfo:
        """Spawn the core and wait until its model is loaded; blocking (call it off the event loop). Its info
        describes the model (`CoreInfo.model`), for an engine to be made before `start`. Raises ModelLoadError if
        the core can't start."""
        self._stopping = False
        ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA cannot be forked
        ours, theirs = ctx.Pipe(duplex=True)
        # Not a daemon: the core may start tensor-parallel workers of its own. It exits when this process does.
        process = ctx.Process(
            target=run_core_process,
            args=(self.config, theirs, logging.getLogger().getEffectiveLevel()),
            name="weir-engine-core",
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        match self._await_ready(process, ours):
            case CoreReady(info):
                pass
            case CoreFailed(message):
                if process.is_alive():  # it started but its description could not be read
                    process.kill()
                process.join(timeout=10)
                self._process = self._conn = None
                raise ModelLoadError(f"the engine core failed to start: {message}")
            case other:
                raise ModelLoadError(f"the engine core sent {other!r} instead of being ready")
        self._stats = info.stats
        self._launched = info
        logger.info("engine core process %d ready", process.pid)
        return info

    async def start(self, deliver: Deliver, on_exit: OnExit) -> CoreInfo:
        """Launch the core unless `launch` did, then read its outputs on a thread; raises ModelLoadError if it
        can't start."""
        info, self._launched = self._launched, None
        if info is None:
            info = await asyncio.to_thread(self.launch)
            self._launched = None
        assert self._conn is not None
        self._reader = threading.Thread(
            target=self._read, args=(self._conn, deliver, on_exit), name="weir-core-read", daemon=True
        )
        self._reader.start()
        return info

    def _await_ready(self, process: BaseProcess, conn: Connection) -> FromCore:
        ready = wait([conn, process.sentinel], timeout=_START_TIMEOUT_S)
        if conn in ready:
            if self.config.model.trust_remote_code:  # its tokenizer's class is in transformers' module cache
                from transformers.dynamic_module_utils import init_hf_modules

                init_hf_modules()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
            try:
                message: FromCore = conn.recv()
                return message
            except EOFError:
                pass
            except Exception as error:  # noqa: BLE001 - an unreadable description fails the start with its reason
                return CoreFailed(f"its model description could not be read: {type(error).__name__}: {error}")
        return CoreFailed(f"the process exited (code {process.exitcode})" if ready else "it timed out")

    async def stop(self) -> None:
        self._stopping = True
        process, conn = self._process, self._conn
        if process is not None and conn is not None:
            with contextlib.suppress(EngineUnavailableError):  # already gone
                self._send(StopCore())
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                logger.warning("engine core did not stop in 30 s; killing it")
                process.kill()
                await asyncio.to_thread(process.join, 10)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
        self._process = self._conn = self._reader = None
        self._launched = None

    def add(self, request: GenerationRequest, num_open: int) -> None:
        # The core's queue is not visible from here: the requests in flight are those admitted and not ended.
        check_in_flight(self.config.scheduler, num_open)
        self._send(AddRequest(request))

    def abort(self, request_id: str) -> None:
        self._send(AbortRequest(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        reply = await self._call(lambda call_id: LoadAdapter(call_id, name, path))
        assert reply.info is not None
        return reply.info

    async def unload_adapter(self, name: str) -> None:
        await self._call(lambda call_id: UnloadAdapter(call_id, name))

    async def _call(self, make: Callable[[int], ToCore]) -> AdapterReply:
        """Send a call to the core and await its reply; its error is raised here as the core raised it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AdapterReply] = loop.create_future()
        call_id = next(self._call_ids)
        self._calls[call_id] = (loop, future)
        try:
            self._send(make(call_id))
            reply = await future
        finally:
            self._calls.pop(call_id, None)
        if reply.error is not None:
            raise reply.error.to_error()
        return reply

    def _answer(self, reply: AdapterReply) -> None:
        entry = self._calls.get(reply.call_id)
        if entry is not None:
            loop, future = entry
            loop.call_soon_threadsafe(_settle, future, reply, None)

    def _fail_calls(self, reason: str) -> None:
        for loop, future in list(self._calls.values()):
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, None, EngineUnavailableError(reason))

    def _send(self, message: ToCore) -> None:
        conn = self._conn
        if conn is None:
            raise EngineUnavailableError("the engine core is not running")
        try:
            with self._send_lock:
                conn.send(message)
        except (OSError, ValueError) as error:
            raise EngineUnavailableError(f"the engine core is gone: {error}") from error

    def _read(self, conn: Connection, deliver: Deliver, on_exit: OnExit) -> None:
        """Reader thread: hand each step's outputs on until the core ends."""
        try:
            while True:
                match conn.recv():
                    case CoreOutputs(packed, stats, kv_events):
                        self._stats = stats
                        deliver(decode_outputs(packed), decode_kv_events(kv_events))
                    case AdapterReply() as reply:
                        self._answer(reply)
                    case other:
                        logger.error("unexpected message from the engine core: %r", other)
        except (EOFError, OSError):
            pass
        self._fail_calls("the engine core process ended")
        if not self._stopping:
            logger.error("the engine core process exited unexpectedly; failing every request in flight")
            self._reader = None  # not running any more: health and new requests see it
            on_exit(f"the engine core process exited (code {self._exit_code()})")

    def _exit_code(self) -> int | None:
        process = self._process
        if process is None:
            return None
        process.join(timeout=2)
        return process.exitcode


def _settle(future: asyncio.Future[AdapterReply], reply: AdapterReply | None, error: BaseException | None) -> None:
    """Resolve a call's future on its own loop, unless the caller gave up on it."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert reply is not None
        future.set_result(reply)
