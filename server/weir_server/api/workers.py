"""A request's CPU work (tokenizing, rendering chat templates, detokenizing, building big replies) runs here, on a
bounded pool of threads, so the event loop, health checks included, always answers promptly.

The work is a function of a checkpoint that it calls between its steps. Once the call's deadline has passed or its
caller went away, the checkpoint raises, so the work stops at its next step; work still queued when its call is
cancelled never starts. A step itself is bounded by the request limits (the largest is one tokenizer call over
`max_text_bytes`), and the Rust tokenizer releases the GIL while it runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from weir_server.api.errors import CallCancelledError, DeadlineExceededError
from weir_server.errors import EngineUnavailableError
from weir_server.tokenization import Checkpoint

T = TypeVar("T")
MAX_DEFAULT_THREADS = 4
SHUTTING_DOWN = "the server is shutting down; retry on another server"


class WorkTicket:
    """The checkpoint of one call's work: raises once the call is past `deadline` (monotonic) or cancelled."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.cancelled = False  # set on the event loop, read by the worker: a plain bool is enough under the GIL

    def __call__(self) -> None:
        if self.cancelled:
            raise CallCancelledError("the call was cancelled; its work was dropped")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceededError("the call's deadline passed before its work was done")


class WorkerPool:
    """Threads for the CPU work of requests."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or min(MAX_DEFAULT_THREADS, os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="weir-frontend")
        self._waiting: dict[WorkTicket, asyncio.Future[Any]] = {}
        self._closed = False

    async def run(self, work: Callable[[Checkpoint], T], timeout_s: float | None = None) -> T:
        """`work(checkpoint)` on a worker thread; `timeout_s` is what is left of the call's deadline."""
        if self._closed:
            raise EngineUnavailableError(SHUTTING_DOWN)
        ticket = WorkTicket(None if timeout_s is None else time.monotonic() + timeout_s)

        def start() -> T:
            ticket()  # it may have waited in the queue past its deadline
            return work(ticket)

        loop = asyncio.get_running_loop()
        result: asyncio.Future[T] = loop.create_future()
        job = self._executor.submit(start)
        job.add_done_callback(lambda done: _hand_back(loop, done, result))
        self._waiting[ticket] = result
        try:
            return await result
        except asyncio.CancelledError:
            ticket.cancelled = True  # running work stops at its next checkpoint
            job.cancel()  # queued work never starts
            raise
        finally:
            del self._waiting[ticket]

    def shutdown(self) -> None:
        """End every call waiting on work (EngineUnavailableError) and drop queued work; running work stops at its
        next checkpoint."""
        self._closed = True
        for ticket, result in list(self._waiting.items()):
            ticket.cancelled = True
            if not result.done():
                result.set_exception(EngineUnavailableError(SHUTTING_DOWN))
        self._executor.shutdown(wait=False, cancel_futures=True)


def _hand_back(loop: asyncio.AbstractEventLoop, job: Future[T], result: asyncio.Future[T]) -> None:
    """On the worker: pass the outcome to the event loop, unless nobody waits for it any more."""
    if result.done():  # the call ended (cancelled, or shut down); reading the flag from here is safe
        return
    try:
        loop.call_soon_threadsafe(_deliver, job, result)
    except RuntimeError:  # the loop is closed: the server stopped while this step ran, and every call ended
        return


def _deliver(job: Future[T], result: asyncio.Future[T]) -> None:
    """On the event loop: the worker's outcome, unless the call already ended (cancelled, or shut down)."""
    if result.done():
        return
    if job.cancelled():
        result.cancel()
    elif (error := job.exception()) is not None:
        result.set_exception(error)
    else:
        result.set_result(job.result())
