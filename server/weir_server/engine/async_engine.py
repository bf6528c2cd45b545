"""AsyncEngine: the engine's steps run on their own thread; each request reads its outputs as an async stream."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from weir_server.config import EngineConfig
from weir_server.engine.engine_loop import EngineLoop
from weir_server.engine.llm_engine import LLMEngine
from weir_server.engine.stats import EngineStats
from weir_server.engine.types import Constraint, GenerationOutput, GenerationRequest
from weir_server.errors import EngineUnavailableError, InvalidRequestError

if TYPE_CHECKING:
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)



def merge_into(queued: GenerationOutput, later: GenerationOutput) -> None:
    """Fold a choice's later output into its queued, not yet read one, in order (the later finish and usage win).
    In place: the queued output belongs to its stream until it is read."""
    queued.text += later.text
    queued.token_ids = queued.token_ids + later.token_ids
    if later.logprobs is not None:
        queued.logprobs = (queued.logprobs or []) + later.logprobs
    if queued.prompt_logprobs is None:
        queued.prompt_logprobs = later.prompt_logprobs
    queued.finish_reason, queued.stop_reason, queued.error = later.finish_reason, later.stop_reason, later.error
    queued.usage, queued.timing = later.usage, later.timing


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RequestStream:
    """The outputs of one request waiting for its consumer; queued deltas of a choice are merged."""

    def __init__(self, request_id: str, num_choices: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request_id = request_id
        self.loop = loop  # the event loop its consumer runs on
        self.unfinished = set(range(num_choices))
        self._queue: deque[GenerationOutput] = deque()
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def put(self, output: GenerationOutput) -> None:
        if output.finished:
            self.unfinished.discard(output.index)
        for i in range(len(self._queue) - 1, -1, -1):
            queued = self._queue[i]
            if queued.index == output.index:
                if not queued.finished:
                    merge_into(queued, output)
                    self._ready.set()
                    return
                break
        self._queue.append(output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self.unfinished.clear()
        self._ready.set()

    async def get(self) -> GenerationOutput | None:
        """The next (possibly merged) output, or None once every choice has finished and been read."""
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self.finished:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()


class StreamingEngine:
    """What the API layer calls: admits requests from asyncio and streams each one's outputs back.

    Subclasses say where the engine runs (`_admit`, `_abort`, `start`, `shutdown`); the streams are shared.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.model_id = loaded.model_id
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.vocab_size
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called (from any thread) with the reason when the engine ends on its own and will not come back.
        self.on_death: Callable[[str], None] | None = None

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    async def prepare_constraint(self, constraint: Constraint) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def _validate(self, request: GenerationRequest) -> GenerationRequest:
        raise NotImplementedError

    def _admit(self, request: GenerationRequest) -> None:
        """Hand a validated request to the engine; raises QueueFullError when it can take no more."""
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _is_stopping(self) -> bool:
        raise NotImplementedError

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Validate and queue a request; raises InvalidRequestError / QueueFullError before yielding anything."""
        if not self.is_running or self._is_stopping():
            raise EngineUnavailableError("the engine is not running")
        if request.request_id in self._streams:
            raise InvalidRequestError("request_id", f"request {request.request_id!r} is already running")
        request = self._validate(request)
        if not request.arrival_time:
            request = dataclasses.replace(request, arrival_time=time.time())
        # Registered before the engine sees the request, so its first outputs always find the stream.
        stream = RequestStream(request.request_id, request.params.n, _running_loop() or self._loop)
        self._streams[request.request_id] = stream
        try:
            self._admit(request)
        except BaseException:
            del self._streams[request.request_id]
            raise
        return self._iterate(stream)

    async def _iterate(self, stream: RequestStream) -> AsyncIterator[GenerationOutput]:
        try:
            while (output := await stream.get()) is not None:
                self._complete(output)
                yield output
        finally:
            # Closed early (client gone, cancelled) or done: either way the engine forgets the request.
            if self._streams.pop(stream.request_id, None) is not None and not stream.finished:
                self._abort(stream.request_id)
            self._forget(stream.request_id)

    def _complete(self, output: GenerationOutput) -> None:
        """Finish an output as its consumer reads it (after queued deltas were merged)."""

    def _forget(self, request_id: str) -> None:
        """Drop what this side keeps of a request once its stream has ended."""

    def _fail_streams(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.fail(error)
        self._streams.clear()

    def _deliver(self, outputs: list[GenerationOutput], stats: EngineStats | None = None) -> None:
        """Hand outputs to the event loop(s) of their consumers, from any thread; never blocks."""
        by_loop: dict[asyncio.AbstractEventLoop, list[GenerationOutput]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None and stream.loop is not None:
                by_loop.setdefault(stream.loop, []).append(output)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._dispatch, batch)
            except RuntimeError:
                logger.warning("event loop closed; dropping %d outputs", len(batch))

    def _dispatch(self, outputs: list[GenerationOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)


class AsyncEngine(StreamingEngine):
    """Runs `LLMEngine.step()` on a worker thread of this process."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        self.engine = LLMEngine(loaded, config)
        self.core = EngineLoop(self.engine, self._deliver)
        self._thread: threading.Thread | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self.is_running:
            return
        self._loop = asyncio.get_running_loop()
        self.core = EngineLoop(self.engine, self._deliver)
        self._thread = threading.Thread(target=self.core.run, name="weir-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine thread; every open stream fails with EngineUnavailableError."""
        self.core.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._fail_streams(EngineUnavailableError("the engine is shutting down"))

    async def prepare_constraint(self, constraint: Constraint) -> None:
        """Check and compile an output constraint off the event loop (a schema may take a while); `generate`
        then finds it compiled. Raises InvalidRequestError naming the constraint's field."""
        await asyncio.to_thread(self.engine.structured.validate, constraint)

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step."""
        return self.core.last_stats

    def _is_stopping(self) -> bool:
        return self.core.stopping

    def _validate(self, request: GenerationRequest) -> GenerationRequest:
        return self.engine.validate(request)

    def _admit(self, request: GenerationRequest) -> None:
        self.core.add(request)

    def _abort(self, request_id: str) -> None:
        self.core.abort(request_id)
