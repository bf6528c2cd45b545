"""The engine core in its own process, and the server-side client that streams from it.

Why a process: on a GPU the engine's host work (schedule, prepare, sample, detokenize) and the gRPC event
loop's per-message work both need the one GIL of a process. Measured on an H100 at 512 streams (bench/RESULTS.md),
the engine thread alone stepped at 42-49k tokens/s while gRPC beside it on the same GIL reached 17-20k. In its own
process the core steps at its own pace and the server process merges the outputs of streams that fall behind into
fewer, larger messages. On a CPU the model's matmuls need every core and the GIL is mostly released, so there the
engine stays a thread (`--engine-core auto`).

Wire: the server sends ("add", GenerationRequest), ("abort", request_id) and ("stop",) over one pipe; the core
answers ("ready", CoreInfo) once, then ("outputs", [GenerationOutput fields as a tuple], EngineStats) per step, or
("failed", text).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import operator
import os
import queue
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import torch

from weir_server.config import EngineConfig
from weir_server.engine.async_engine import StreamingEngine
from weir_server.engine.output_text import OutputText
from weir_server.engine.scheduler import check_in_flight
from weir_server.engine.stats import EngineStats
from weir_server.engine.structured import StructuredOutputs
from weir_server.engine.types import Constraint, GenerationOutput, GenerationRequest
from weir_server.engine.validation import RequestValidator
from weir_server.errors import EngineUnavailableError, ModelLoadError
from weir_server.models.loader import resolve_device
from weir_server.process_lifetime import exit_with_parent, freeze_startup_objects

if TYPE_CHECKING:
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 1800.0  # loading a large checkpoint and capturing CUDA graphs can take minutes
# Outputs cross the pipe as plain tuples of their fields: pickling hundreds of dataclasses per step costs the core
# five times as much (0.7 vs 0.14 ms for 512).
_WIRE_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(GenerationOutput)))


@dataclass(frozen=True)
class CoreInfo:
    """What the core learned while starting that the server needs to validate requests."""

    max_seq_len: int
    stats: EngineStats


def engine_core_main(config: EngineConfig, conn: Connection, log_level: int) -> None:
    """The core process: load the model, then step it until told to stop or the server process is gone."""
    from weir_server.engine.engine_loop import EngineLoop
    from weir_server.engine.llm_engine import LLMEngine
    from weir_server.executor.tp_executor import launch
    from weir_server.models.loader import load_model

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine core] %(name)s: %(message)s")
    exit_with_parent()
    try:
        launch(config)  # this process is rank 0 of a tensor-parallel group (no-op at size 1)
        loaded = load_model(config.model, "generate")
        engine = LLMEngine(loaded, config)
        engine.detokenize_all = False  # the server process makes the text (OutputText)
    except Exception as error:
        logger.exception("engine core failed to start")
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        os._exit(1)
    # Outputs leave through a sender thread: pickling and a pipe write that blocks while the server is busy
    # must not hold up the next step. The sender pickles while the loop waits for the GPU (GIL released).
    # Steps that pile up while the server reads go out as one message.
    outbox: queue.SimpleQueue[tuple[list[GenerationOutput], EngineStats] | None] = queue.SimpleQueue()

    def send() -> None:
        done = False
        try:
            while not done and (item := outbox.get()) is not None:
                outputs, stats = item
                while not outbox.empty():
                    more = outbox.get_nowait()
                    if more is None:
                        done = True
                        break
                    outputs, stats = outputs + more[0], more[1]
                conn.send(("outputs", [_WIRE_FIELDS(o) for o in outputs], stats))
        except (OSError, ValueError):  # the server is gone; the parent watch ends this process
            pass

    def deliver(outputs: list[GenerationOutput], stats: EngineStats) -> None:
        outbox.put((outputs, stats))

    core = EngineLoop(engine, deliver)
    freeze_startup_objects()

    def receive() -> None:
        try:
            while True:
                message = conn.recv()
                if message[0] == "add":
                    core.add(message[1], check_capacity=False)  # the server counts what it admits
                elif message[0] == "abort":
                    core.abort(message[1])
                else:
                    break
        except (EOFError, OSError):
            pass
        core.stop()

    conn.send(("ready", CoreInfo(engine.max_seq_len, engine.stats())))
    sender = threading.Thread(target=send, name="weir-core-send", daemon=True)
    sender.start()
    threading.Thread(target=receive, name="weir-core-receive", daemon=True).start()
    core.run()
    outbox.put(None)
    sender.join(timeout=5)
    logging.shutdown()
    os._exit(0)  # teardown of CUDA graphs and helper threads can stall; nothing here needs it


def runs_in_own_process(config: EngineConfig) -> bool:
    """Whether the generation engine gets an engine-core process (ExecutorConfig.engine_core; auto = on CUDA)."""
    choice = config.executor.engine_core
    if choice == "auto":
        return resolve_device(config.model.device).type == "cuda"
    return choice == "process"


class EngineCoreClient(StreamingEngine):
    """The server side of an engine-core process: validates and admits requests here, steps run there."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        """`loaded` needs no weights (`load_model(..., weights=False)`): the core loads its own."""
        super().__init__(loaded, config)
        # Constraints compile here too (lazily) so a bad one is refused before it reaches the core.
        self.structured = StructuredOutputs(
            loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids, torch.device("cpu")
        )
        self._validator: RequestValidator | None = None
        self._text = OutputText(loaded.tokenizer)
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self._stats = EngineStats(0, 0, 0, 0, config.cache.block_size, 0, 0, 0, 0, 0)

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.is_alive() and self._reader is not None

    async def start(self) -> None:
        """Spawn the core and wait until its model is loaded; raises ModelLoadError if it can't start."""
        if self.is_running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA cannot be forked
        ours, theirs = ctx.Pipe(duplex=True)
        # Not a daemon: the core may start tensor-parallel workers of its own. It exits when this process does.
        process = ctx.Process(
            target=engine_core_main,
            args=(self.config, theirs, logging.getLogger().getEffectiveLevel()),
            name="weir-engine-core",
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        message = await asyncio.to_thread(self._await_ready, process, ours)
        if message[0] != "ready":
            process.join(timeout=10)
            self._process = self._conn = None
            raise ModelLoadError(f"the engine core failed to start: {message[1]}")
        info: CoreInfo = message[1]
        self._stats = info.stats
        self._validator = RequestValidator(self.vocab_size, self.max_model_len, info.max_seq_len, self.structured)
        self._reader = threading.Thread(target=self._read, args=(ours,), name="weir-core-read", daemon=True)
        self._reader.start()
        logger.info("engine core process %d ready", process.pid)

    @staticmethod
    def _await_ready(process: BaseProcess, conn: Connection) -> tuple[Any, ...]:
        ready = wait([conn, process.sentinel], timeout=_START_TIMEOUT_S)
        if conn in ready:
            try:
                return conn.recv()
            except EOFError:
                pass
        return ("failed", f"the process exited (code {process.exitcode})" if ready else "it timed out")

    async def shutdown(self) -> None:
        """Stop the core; every open stream fails with EngineUnavailableError."""
        self._stopping = True
        process, conn = self._process, self._conn
        if process is not None and conn is not None:
            with contextlib.suppress(EngineUnavailableError):  # already gone
                self._send(("stop",))
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                logger.warning("engine core did not stop in 30 s; killing it")
                process.kill()
                await asyncio.to_thread(process.join, 10)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
        self._process = self._conn = self._reader = None
        self._fail_streams(EngineUnavailableError("the engine is shutting down"))

    async def prepare_constraint(self, constraint: Constraint) -> None:
        await asyncio.to_thread(self.structured.validate, constraint)

    def stats(self) -> EngineStats:
        return self._stats

    def _is_stopping(self) -> bool:
        return self._stopping

    def _validate(self, request: GenerationRequest) -> GenerationRequest:
        assert self._validator is not None
        return self._validator.validate(request)

    def _admit(self, request: GenerationRequest) -> None:
        # The core's queue is not visible from here: the requests in flight are the open streams.
        # Counting the open streams, this request's own (registered just before) excluded.
        check_in_flight(self.config.scheduler, len(self._streams) - 1)
        self._text.add_request(request)
        try:
            self._send(("add", request))
        except EngineUnavailableError:
            self._text.forget(request.request_id)
            raise

    def _abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _complete(self, output: GenerationOutput) -> None:
        # Made as the consumer reads it: outputs merged while it was behind are decoded together.
        self._text.fill(output)

    def _forget(self, request_id: str) -> None:
        self._text.forget(request_id)

    def _send(self, message: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise EngineUnavailableError("the engine core is not running")
        try:
            with self._send_lock:
                conn.send(message)
        except (OSError, ValueError) as error:
            raise EngineUnavailableError(f"the engine core is gone: {error}") from error

    def _exit_code(self) -> int | None:
        process = self._process
        if process is None:
            return None
        process.join(timeout=2)
        return process.exitcode

    def _read(self, conn: Connection) -> None:
        """Reader thread: hand each step's outputs to the event loop(s) until the core ends."""
        try:
            while True:
                message = conn.recv()
                if message[0] == "outputs":
                    self._stats = message[2]
                    self._deliver([GenerationOutput(*fields) for fields in message[1]])
        except (EOFError, OSError):
            pass
        if not self._stopping:
            logger.error("the engine core process exited unexpectedly; failing every request in flight")
            error = EngineUnavailableError("the engine core process exited")
            self._reader = None  # not running any more: health and new requests see it
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_streams, error)
            if self.on_death is not None:
                self.on_death(f"the engine core process exited (code {self._exit_code()})")
