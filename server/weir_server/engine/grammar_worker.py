"""Constraint compiles in worker processes that can be ended: xgrammar compiles in C++ that no thread can interrupt,
so a compile past its time budget, or one that nobody waits for any more, ends with its process.

Workers are forked from multiprocessing's fork server, which imports xgrammar (and torch with it) once: a worker
starts in about 0.1 s instead of the 2-4 s of a fresh interpreter, so replacing a killed one costs little. A worker
only measures a constraint: it answers how long the compile took and how much memory the result holds. Sending the
compiled grammar back costs more than compiling it again (xgrammar serializes its token masks as JSON lists, 10-100
times their size), so the server compiles a constraint a worker has vetted itself (grammar_compiler.py), or, in front
of an engine-core process, leaves that to the core and keeps only the verdict (constraint_validator.py).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import resource
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from weir_server.engine.grammars import (
    OUT_OF_MEMORY,
    allowed_row,
    check_startable,
    compile_constraint,
    load_xgrammar,
    tokenizer_info_json,
)
from weir_server.engine.structured_config import COMPILE_QUEUE_FLAG, COMPILE_TIMEOUT_FLAG
from weir_server.engine.types import Constraint
from weir_server.errors import EngineUnavailableError, InvalidRequestError, QueueFullError

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The fork server imports these once; every worker forked from it has them.
_PRELOAD = ["__main__", "xgrammar", __name__]


def worker_context() -> ForkServerContext:
    """The fork server the workers start from (it imports xgrammar, and torch with it, in its own process)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def tokenizer_info_elsewhere(tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int]) -> str:
    """`tokenizer_info_json`, made in a worker process: a server process that has not loaded xgrammar (nor
    torch) stays without them."""
    with ProcessPoolExecutor(1, mp_context=worker_context()) as pool:
        return pool.submit(tokenizer_info_json, tokenizer, vocab_size, tuple(stop_token_ids)).result()


@dataclass(frozen=True)
class Probe:
    """What a worker learned compiling a constraint: how long it took and the memory the compiled grammar holds."""

    seconds: float
    memory_bytes: int


class CompileAbandoned(EngineUnavailableError):
    """Every request waiting for a compile went away, or the server is stopping; its worker was ended."""


class CompileJob:
    """One constraint's compile in a worker: `future` gets its Probe or InvalidRequestError; `cancel` ends it."""

    def __init__(self, constraint: Constraint, workers: CompileWorkers) -> None:
        self.constraint = constraint
        self.future: Future[Probe] = Future()
        self._workers = workers

    def cancel(self) -> None:
        """Drop the job if it still waits; kill its worker if it runs (a fresh worker replaces it)."""
        self._workers.cancel(self)


class _Slot:
    """One worker process and the thread that feeds it jobs; `job` is None once the running job was cancelled."""

    def __init__(self) -> None:
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.job: CompileJob | None = None


class CompileWorkers:
    """A fixed number of worker processes, each compiling one constraint at a time within `budget_s`; at most
    `max_queued` constraints wait for a worker. `shutdown` kills them all at once."""

    def __init__(
        self,
        tokenizer_json: str,
        size: int,
        budget_s: float,
        max_queued: int,
        memory_limit_bytes: int,
        forbidden: tuple[int, ...] = (),
    ) -> None:
        self._tokenizer_json = tokenizer_json
        self._forbidden = forbidden
        self._budget_s = budget_s
        self._max_queued = max_queued
        self._memory_limit_bytes = memory_limit_bytes
        self._queue: deque[CompileJob] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        self._context = worker_context()
        self._slots = [_Slot() for _ in range(size)]
        for i, slot in enumerate(self._slots):
            threading.Thread(target=self._serve, args=(slot,), name=f"weir-grammar-worker-{i}", daemon=True).start()

    def submit(self, constraint: Constraint) -> CompileJob:
        """Queue a compile; raises QueueFullError when `max_queued` already wait."""
        job = CompileJob(constraint, self)
        with self._ready:
            if self._stopped:
                raise CompileAbandoned("the server is stopping")
            if len(self._queue) >= self._max_queued:
                raise QueueFullError(
                    f"{len(self._queue)} new constraints wait to be compiled; the limit is {self._max_queued} "
                    f"({COMPILE_QUEUE_FLAG})"
                )
            self._queue.append(job)
            self._ready.notify()
        return job

    def cancel(self, job: CompileJob) -> None:
        with self._ready:
            if job in self._queue:
                self._queue.remove(job)
                job.future.set_exception(CompileAbandoned("nobody waits for this compile"))
                return
            for slot in self._slots:
                if slot.job is job:
                    slot.job = None  # its thread reports the job abandoned and replaces the worker
                    if slot.process is not None:
                        slot.process.kill()

    def shutdown(self) -> None:
        """Kill every worker and fail every compile, now: never waits for xgrammar."""
        with self._ready:
            self._stopped = True
            queued, self._queue = list(self._queue), deque()
            for slot in self._slots:
                slot.job = None
                if slot.process is not None:
                    slot.process.kill()
            self._ready.notify_all()
        for job in queued:
            job.future.set_exception(CompileAbandoned("the server is stopping"))

    def _serve(self, slot: _Slot) -> None:
        """A slot's thread: keep a worker started, hand it one job at a time and watch each one's budget."""
        while True:
            self._keep_worker(slot)
            with self._ready:
                while not self._queue and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    break
                job = slot.job = self._queue.popleft()
            outcome = self._run(slot, job)
            with self._ready:
                abandoned = slot.job is not job
                slot.job = None
            if not isinstance(outcome, tuple):
                self._end_worker(slot)
            self._settle(job, CompileAbandoned("nobody waits for this compile") if abandoned else outcome)
        self._end_worker(slot)

    def _keep_worker(self, slot: _Slot) -> None:
        """Start the slot's worker ahead of its next job (a killed one is replaced at once)."""
        if self._stopped:
            return
        try:
            self._start_worker(slot)
        except Exception:  # the next job tries again and fails with this error if it persists
            logger.exception("could not start a grammar worker")

    def _run(self, slot: _Slot, job: CompileJob) -> tuple[Any, ...] | Exception:
        """The worker's answer, TimeoutError past the budget, or the error of a worker that died or was killed."""
        try:
            process, conn = self._start_worker(slot)
            with self._ready:
                if slot.job is not job:  # cancelled while the worker started: it was not killed
                    return CompileAbandoned("nobody waits for this compile")
            conn.send(job.constraint)
            if not wait([conn, process.sentinel], timeout=self._budget_s):
                return TimeoutError()
            answer: tuple[Any, ...] = conn.recv()
            return answer
        except Exception as error:  # the worker died, was killed, or could not start: `_settle` reports it
            return error

    def _start_worker(self, slot: _Slot) -> tuple[BaseProcess, Connection]:
        if slot.process is not None and slot.conn is not None and slot.process.is_alive():
            return slot.process, slot.conn
        self._end_worker(slot)
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(self._tokenizer_json, theirs, self._memory_limit_bytes, self._forbidden),
            name="weir-grammar-worker",
            daemon=True,
        )
        process.start()
        theirs.close()
        with self._ready:  # under the lock: `cancel` and `shutdown` see the process they must kill
            slot.process, slot.conn = process, ours
            if self._stopped:
                process.kill()
        return process, ours

    def _end_worker(self, slot: _Slot) -> None:
        with self._ready:
            process, conn = slot.process, slot.conn
            slot.process = slot.conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            process.kill()
            process.join(timeout=5)

    def _settle(self, job: CompileJob, outcome: object) -> None:
        kind = job.constraint.kind
        if isinstance(outcome, tuple) and outcome[0] == "ok":
            job.future.set_result(Probe(outcome[1], outcome[2]))
        elif isinstance(outcome, tuple):
            job.future.set_exception(InvalidRequestError(outcome[1], outcome[2]))
        elif isinstance(outcome, CompileAbandoned):
            logger.debug("a %s compile was abandoned; its worker was ended", kind)
            job.future.set_exception(outcome)
        elif isinstance(outcome, TimeoutError):
            logger.warning("a %s constraint did not compile within %g s; its worker was ended", kind, self._budget_s)
            message = f"did not compile within this server's {self._budget_s:g} s limit ({COMPILE_TIMEOUT_FLAG})"
            job.future.set_exception(InvalidRequestError(kind, message))
        else:
            logger.warning("a grammar worker died compiling a %s constraint: %s", kind, outcome)
            message = "could not be compiled: the compiler ran out of memory or crashed"
            job.future.set_exception(InvalidRequestError(kind, message))


def worker_main(
    tokenizer_json: str, conn: Connection, memory_limit_bytes: int, forbidden: tuple[int, ...] = ()
) -> None:
    """A worker process: compile each constraint it is sent and answer ("ok", seconds, memory bytes) or
    ("invalid", field, message), until its pipe closes. A grammar no token but the `forbidden` ones can begin is
    invalid too."""
    xgr = load_xgrammar()
    info = xgr.TokenizerInfo.deserialize_json(tokenizer_json)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    allowed = allowed_row(info.vocab_size, forbidden)
    _limit_memory(memory_limit_bytes)
    while True:
        try:
            constraint: Constraint = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_probe(compiler, constraint, info.vocab_size, allowed))


def _probe(
    compiler: xgr.GrammarCompiler, constraint: Constraint, vocab_size: int, allowed: torch.Tensor
) -> tuple[Any, ...]:
    start = time.perf_counter()
    try:
        compiled = compile_constraint(compiler, constraint)
        seconds = time.perf_counter() - start
        check_startable(constraint.kind, compiled, vocab_size, allowed)
    except InvalidRequestError as error:
        return ("invalid", error.field, error.description)
    except MemoryError:
        return ("invalid", constraint.kind, OUT_OF_MEMORY)
    return ("ok", seconds, compiled.memory_size_bytes)


def _limit_memory(extra_bytes: int) -> None:
    """Cap the worker's address space at what it maps now plus `extra_bytes`: a grammar that would need more fails
    to allocate here instead of growing the machine's memory."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    limit = mapped + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
