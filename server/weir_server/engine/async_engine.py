"""AsyncEngine: what the API layer calls. Admits requests from asyncio and streams each one's outputs back, over a
CoreClient that reaches the EngineCore (on a thread here, or in a process of its own)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from weir_server.config import EngineConfig
from weir_server.engine.core_client import CoreClient
from weir_server.engine.kv_events import KvEvent, KvEventLog
from weir_server.engine.lora_manager import check_adapter_name
from weir_server.engine.output import OutputText
from weir_server.engine.stats import EngineStats
from weir_server.engine.types import AdapterInfo, Constraint, GenerationOutput, GenerationRequest
from weir_server.engine.validation import ConstraintChecks, RequestValidator
from weir_server.engine.wire import ModelDescription
from weir_server.errors import EngineUnavailableError, InvalidRequestError, NotFoundError

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


class AsyncEngine:
    """Validates and admits requests, hands them to its core, and streams each one's outputs back.

    `loaded` is the model where the core runs here, its description where the core has a process of its own.
    `structured` checks the constraints of requests (the core's own StructuredOutputs where it runs here, so
    `generate` finds them compiled); `text` makes the text of the outputs whose core leaves it to the server
    process (None: the core makes all text).
    """

    def __init__(
        self,
        loaded: LoadedModel | ModelDescription,
        config: EngineConfig,
        client: CoreClient,
        structured: ConstraintChecks,
        text: OutputText | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.client = client
        self.structured = structured
        self.model_id = loaded.model_id
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.vocab_size
        self._text = text
        self._validator: RequestValidator | None = None  # once started: the core's context limit is known
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.kv_events = KvEventLog()  # the core's prefix cache as its events tell it, for WatchKvEvents
        # The LoRA adapters requests may name; one being unloaded leaves at once (its requests in flight finish).
        self._adapters: dict[str, AdapterInfo] = {}
        # Called (from any thread) with the reason when the core ends on its own and will not come back.
        self.on_death: Callable[[str], None] | None = None

    @property
    def is_running(self) -> bool:
        return self.client.is_running

    async def start(self) -> None:
        """Start the core (idempotent); raises ModelLoadError if it cannot start."""
        if self.is_running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        info = await self.client.start(self._deliver, self._core_exited)
        self._adapters = {adapter.name: adapter for adapter in info.adapters}
        self._validator = RequestValidator(self.vocab_size, self.max_model_len, info.max_seq_len, self.structured)

    async def shutdown(self) -> None:
        """Stop the core; every open stream fails with EngineUnavailableError."""
        self._stopping = True
        await self.client.stop()
        if self.structured is not None:
            self.structured.shutdown()  # after the core stopped: a step may still be filling a mask until then
        self._fail_streams(EngineUnavailableError("the engine is shutting down"))

    async def prepare_constraint(self, constraint: Constraint) -> None:
        """Check and compile an output constraint off the event loop (a schema may take a while); `generate`
        then finds it compiled. Raises InvalidRequestError naming the constraint's field."""
        # Compiled in a worker process that a cancelled call (deadline passed, client gone) kills.
        await self.structured.prepare(constraint)

    def stats(self) -> EngineStats:
        """The core's counters as of its last step."""
        return self.client.stats()

    # ---- LoRA adapters ----------------------------------------------------------------------------------

    @property
    def lora_enabled(self) -> bool:
        return self.config.lora is not None

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Read a PEFT LoRA adapter from `path` (a folder on the server's host) and serve it as `name`. Raises
        InvalidRequestError naming the problem: LoRA off, a taken or bad name, a rank over the limit, shapes that
        do not match the base model, missing or unreadable files, unsupported target modules."""
        self._check_lora_enabled()
        if not self.is_running:
            raise EngineUnavailableError("the engine is not running")
        check_adapter_name(name, self.model_id)
        if name in self._adapters:
            raise InvalidRequestError("name", f"an adapter named {name!r} is already loaded")
        info = await self.client.load_adapter(name, path)
        self._adapters[name] = info
        return info

    async def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter: new requests for it are refused at once, those in flight finish, then its
        memory is freed. Raises NotFoundError for an adapter not loaded."""
        self._check_lora_enabled()
        if name not in self._adapters:
            raise NotFoundError(f"adapter {name!r} is not loaded")
        info = self._adapters.pop(name)
        try:
            await self.client.unload_adapter(name)
        except NotFoundError:
            raise
        except BaseException:
            self._adapters.setdefault(name, info)  # the core still serves it
            raise

    def list_adapters(self) -> list[AdapterInfo]:
        """The adapters requests may name, in load order."""
        return list(self._adapters.values())

    def _check_lora_enabled(self) -> None:
        if self.config.lora is None:
            raise InvalidRequestError("", "LoRA adapters are not enabled on this server (start it with --enable-lora)")

    def _check_adapter(self, name: str) -> None:
        if name not in self._adapters:
            off = "" if self.config.lora is not None else " (LoRA adapters are not enabled on this server)"
            raise NotFoundError(f"adapter {name!r} is not loaded{off}")

    def abort(self, request_id: str, error: BaseException) -> bool:
        """Cancel a request wherever it is: its stream ends with `error` and the core frees its blocks on its next
        iteration. False when the request is unknown or already finished (not an error: aborts are idempotent)."""
        stream = self._streams.pop(request_id, None)
        if stream is None or stream.finished:
            return False
        stream.fail(error)
        self.client.abort(request_id)
        return True

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Validate and queue a request; raises InvalidRequestError / QueueFullError before yielding anything."""
        if not self.is_running or self._stopping or self._validator is None:
            raise EngineUnavailableError("the engine is not running")
        if request.request_id in self._streams:
            raise InvalidRequestError("request_id", f"request {request.request_id!r} is already running")
        if request.adapter is not None:
            self._check_adapter(request.adapter)
        request = self._validator.validate(request)
        if not request.arrival_time:
            request = dataclasses.replace(request, arrival_time=time.time())
        # Registered before the core sees the request, so its first outputs always find the stream.
        stream = RequestStream(request.request_id, request.params.n, _running_loop() or self._loop)
        self._streams[request.request_id] = stream
        if self._text is not None:
            self._text.add_request(request)
        try:
            self.client.add(request, num_open=len(self._streams) - 1)  # this request's own stream excluded
        except BaseException:
            del self._streams[request.request_id]
            if self._text is not None:
                self._text.forget(request.request_id)
            raise
        return self._iterate(stream)

    async def _iterate(self, stream: RequestStream) -> AsyncIterator[GenerationOutput]:
        text = self._text
        try:
            while (output := await stream.get()) is not None:
                if text is not None:
                    # Made as the consumer reads it: outputs merged while it was behind are decoded together.
                    text.fill(output)
                yield output
        finally:
            # Closed early (client gone, cancelled) or done: either way the core forgets the request.
            if self._streams.pop(stream.request_id, None) is not None and not stream.finished:
                self.client.abort(stream.request_id)
            if text is not None:
                text.forget(stream.request_id)

    def _fail_streams(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.fail(error)
        self._streams.clear()

    def _core_exited(self, reason: str) -> None:
        """The core ended on its own (called on a client thread): fail every stream, then tell `on_death`."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fail_streams, EngineUnavailableError(reason))
        if self.on_death is not None:
            self.on_death(reason)

    def _deliver(self, outputs: list[GenerationOutput], kv_events: list[KvEvent]) -> None:
        """Hand outputs to the event loop(s) of their consumers, and prefix-cache events to the engine's loop, from
        any thread; never blocks."""
        loop = self._loop
        if kv_events and loop is not None:
            try:
                loop.call_soon_threadsafe(self.kv_events.publish, kv_events)
            except RuntimeError:
                logger.warning("event loop closed; dropping %d prefix-cache events", len(kv_events))
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
