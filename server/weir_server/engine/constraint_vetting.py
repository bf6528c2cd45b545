"""Constraints checked once per server: a new one is first vetted in a worker process that can be killed
(grammar_worker.py) within its time and memory budget, then finished here; requests asking for the same constraint
meanwhile share its check, and results are kept in an LRU bounded by the memory they hold.

`ConstraintVetting` is the machinery, without xgrammar or torch: the engine's `ConstraintCompiler`
(grammar_compiler.py) finishes a constraint by compiling it, and the `ConstraintValidator` of a server process in
front of an engine-core process (constraint_validator.py) by remembering the worker's verdict.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from weir_server.engine.grammar_worker import CompileAbandoned, CompileJob, CompileWorkers, Probe
from weir_server.engine.structured_config import MAX_COMPILED_FLAG, MIB, StructuredOutputConfig
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError, WeirError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ENTRY_OVERHEAD_BYTES = 1024  # the cache's own objects per entry


def constraint_bytes(constraint: Constraint) -> int:
    """The UTF-8 size of a constraint's text (every choice together)."""
    texts = constraint.value if isinstance(constraint.value, tuple) else (constraint.value,)
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


def entry_bytes(constraint: Constraint, held_bytes: int = 0) -> int:
    """What a cached result costs: what it holds, the constraint's text and the cache's own objects."""
    return held_bytes + constraint_bytes(constraint) + _ENTRY_OVERHEAD_BYTES


class GrammarCache(Generic[T]):
    """Results by constraint; the least recently used are evicted while they hold more than `max_bytes`.
    Not thread-safe: its owner locks."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Constraint, tuple[T, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, constraint: Constraint) -> T | None:
        entry = self._entries.get(constraint)
        if entry is None:
            return None
        self._entries.move_to_end(constraint)
        return entry[0]

    def put(self, constraint: Constraint, result: T, size: int) -> None:
        if (old := self._entries.pop(constraint, None)) is not None:
            self.bytes -= old[1]
        self._entries[constraint] = (result, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted


@dataclass(eq=False)
class _Flight(Generic[T]):
    """One constraint's check in progress, shared by every request that waits for it."""

    constraint: Constraint
    future: Future[T] = field(default_factory=Future)
    waiters: int = 0
    job: CompileJob | None = None  # its vetting in a worker, when it has one


class Compilation(Generic[T]):
    """One request's wait for a checked constraint: `future` gets its result (or InvalidRequestError); `release()`
    when the request stops waiting, which abandons the check (killing its worker) if no other request waits."""

    def __init__(self, future: Future[T], owner: ConstraintVetting[T], flight: _Flight[T] | None) -> None:
        self.future = future
        self._owner = owner
        self._flight = flight

    def release(self) -> None:
        flight, self._flight = self._flight, None
        if flight is not None:
            self._owner._release(flight)


async def await_compilation(compilation: Compilation[T]) -> T:
    """Await a check off the event loop. Cancelling the caller (its client gone or past its deadline) ends the
    check unless another request waits for it."""
    result = asyncio.wrap_future(compilation.future)
    # Read even when nobody awaits it any more, or asyncio logs its error ("never retrieved").
    result.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        # Shielded: the check is shared; this request's cancellation only releases its claim on it.
        return await asyncio.shield(result)
    finally:
        compilation.release()


class ConstraintVetting(Generic[T]):
    """Checks constraints, each once at a time, vetting new ones in killable workers and finishing them here
    (`_finish_here`); keeps the results in a cache bounded by memory."""

    def __init__(self, stop_token_ids: Sequence[int], config: StructuredOutputConfig | None = None) -> None:
        self.config = config or StructuredOutputConfig()
        self.stop_token_ids = tuple(stop_token_ids)
        self.cache: GrammarCache[T] = GrammarCache(self.config.cache_memory_bytes)
        self._flights: dict[Constraint, _Flight[T]] = {}
        self._lock = threading.Lock()
        self._workers: CompileWorkers | None = None
        self._workers_lock = threading.Lock()  # held while the workers are set up, which takes a while
        self._stopped = False
        # Finished here one per worker at most: a vetted compile takes about as long as it took there.
        self._compile_slots = threading.BoundedSemaphore(self.config.compile_workers)

    # ---- what a kind of vetting decides ----

    def _needs_worker(self, constraint: Constraint) -> bool:
        """Whether a new constraint is vetted in a worker first (else it is finished here at once)."""
        return True

    def _finish_here(self, constraint: Constraint, probe: Probe | None) -> tuple[T, int]:
        """The result of a constraint that passed its vetting (`probe`: the worker's, if any) and the bytes it holds
        in the cache; raises InvalidRequestError for one that is refused here."""
        raise NotImplementedError

    def _worker_tokenizer(self) -> str:
        """xgrammar's description of the tokenizer, serialized, for the workers."""
        raise NotImplementedError

    def _forbidden_tokens(self) -> Sequence[int]:
        """Tokens no constrained output may hold (the special ones that are not stops)."""
        raise NotImplementedError

    # ---- the shared machinery ----

    def cached(self, constraint: Constraint) -> T | None:
        """The result if it is cached (counts as a use)."""
        with self._lock:
            return self.cache.get(constraint)

    def compile(self, constraint: Constraint, vetted: bool = False) -> T:
        """The result, waiting for it; raises InvalidRequestError naming the kind for a bad or too costly
        constraint. `vetted`: the caller's server already vetted it (skip the worker)."""
        compilation = self.start(constraint, vetted)
        try:
            return compilation.future.result()
        finally:
            compilation.release()

    def start(self, constraint: Constraint, vetted: bool = False) -> Compilation[T]:
        """Begin checking (or join the check of) a constraint; release the result when no longer waiting.
        Raises InvalidRequestError for a constraint over the limits, QueueFullError when too many wait."""
        with self._lock:
            cached = self.cache.get(constraint)
        if cached is not None:
            done: Future[T] = Future()
            done.set_result(cached)
            return Compilation(done, self, None)
        constraint.validate(self.config.limits)
        workers = self._vetting() if not vetted and self._needs_worker(constraint) else None
        with self._lock:
            if self._stopped:
                raise CompileAbandoned("the server is stopping")
            flight = self._flights.get(constraint)
            new = flight is None
            if flight is None:
                flight = _Flight(constraint)
                if workers is not None:
                    flight.job = workers.submit(constraint)  # may raise QueueFullError
                self._flights[constraint] = flight
            flight.waiters += 1
        if new:
            self._begin(flight)
        return Compilation(flight.future, self, flight)

    def shutdown(self) -> None:
        """Kill the workers; checks in progress end with CompileAbandoned."""
        with self._lock:
            self._stopped = True
            workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown()

    def _vetting(self) -> CompileWorkers:
        """The workers, set up on first use outside `_lock` (describing the tokenizer takes a while)."""
        with self._workers_lock:
            if self._workers is None and not self._stopped:
                config = self.config
                started = CompileWorkers(
                    self._worker_tokenizer(),
                    config.compile_workers,
                    config.compile_timeout_s,
                    config.compile_queue,
                    config.worker_memory_bytes,
                    tuple(self._forbidden_tokens()),
                )
                # An engine dropped without `shutdown` (tests make many) takes its workers with it.
                weakref.finalize(self, started.shutdown)
                with self._lock:
                    if not self._stopped:
                        self._workers = started
                if self._workers is not started:  # shut down meanwhile
                    started.shutdown()
            workers = self._workers
        if workers is None:
            raise CompileAbandoned("the server is stopping")
        return workers

    def _begin(self, flight: _Flight[T]) -> None:
        """Finish here once the worker's answer (if any) comes: on a thread of its own, never a waiter's."""
        job = flight.job
        if job is None:
            threading.Thread(target=self._finish, args=(flight, None), name="weir-grammar-compile", daemon=True).start()
        else:
            job.future.add_done_callback(
                lambda vetting: threading.Thread(
                    target=self._finish, args=(flight, vetting), name="weir-grammar-compile", daemon=True
                ).start()
            )

    def _finish(self, flight: _Flight[T], vetting: Future[Probe] | None) -> None:
        constraint = flight.constraint
        try:
            probe = None
            if vetting is not None:
                probe = vetting.result()
                self._check_probe(constraint, probe)
            with self._compile_slots:
                with self._lock:
                    if flight.waiters == 0:  # nobody waits: a request that comes later starts a new flight
                        self._drop(flight)
                        raise CompileAbandoned("nobody waits for this compile")
                result, size = self._finish_here(constraint, probe)
        except Exception as error:  # handed to every waiter, who raises it
            if not isinstance(error, WeirError):
                logger.exception("compiling a %s constraint failed", constraint.kind)
            self._land(flight, None, 0)
            flight.future.set_exception(error)
            return
        self._land(flight, result, size)
        flight.future.set_result(result)

    def _land(self, flight: _Flight[T], result: T | None, size: int) -> None:
        """The flight is over: cache its result and let the next request for its constraint start afresh."""
        with self._lock:
            self._drop(flight)
            if result is not None:
                self.cache.put(flight.constraint, result, size)

    def _release(self, flight: _Flight[T]) -> None:
        """A request stopped waiting. The last one to go ends the check while it is in a worker; one finishing here
        (vetted, so bounded) finishes and is cached, unless it has not started yet."""
        with self._lock:
            flight.waiters -= 1
            job = flight.job
            if flight.waiters > 0 or flight.future.done() or job is None or job.future.done():
                return
            self._drop(flight)
        job.cancel()

    def _drop(self, flight: _Flight[T]) -> None:
        """Forget a flight (under the lock): the next request for its constraint starts afresh."""
        if self._flights.get(flight.constraint) is flight:
            del self._flights[flight.constraint]

    def _check_probe(self, constraint: Constraint, probe: Probe) -> None:
        limit = self.config.max_compiled_bytes
        if probe.memory_bytes > limit:
            raise InvalidRequestError(
                constraint.kind,
                f"compiles to a grammar of {probe.memory_bytes / MIB:.1f} MiB; the limit for one constraint is "
                f"{limit / MIB:.1f} MiB ({MAX_COMPILED_FLAG})",
            )
