"""Constraints compiled once per server. A new one is first vetted in a worker process that can be killed
(grammar_worker.py) within its time and memory budget, then compiled here, its cost now known; compiled grammars
are kept in an LRU bounded by the memory they hold."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from weir_server.engine.grammar_worker import (
    CompileAbandoned,
    CompileJob,
    CompileWorkers,
    Probe,
    compile_constraint,
    load_xgrammar,
)
from weir_server.engine.structured_config import MAX_COMPILED_FLAG, MIB, StructuredOutputConfig
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError, WeirError

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger(__name__)

# Choices this short compile in under 10 ms (about 10 us a byte) and `json_object` is one fixed schema: these skip
# the worker. A regex cannot: `[a-z]{1,5000}` is 13 bytes and compiles for 0.8 s.
CHEAP_CHOICE_BYTES = 1024
_ENTRY_OVERHEAD_BYTES = 1024  # the cache's own objects per entry


def allowed_row(vocab_size: int, forbidden: Sequence[int]) -> torch.Tensor:
    """One bitmask row (int32 words, bit set = allowed) allowing every token but `forbidden`."""
    row: torch.Tensor = load_xgrammar().allocate_token_bitmask(1, vocab_size)[0]
    for token_id in forbidden:
        if 0 <= token_id < vocab_size:
            clear = ~(1 << (token_id % 32)) & 0xFFFFFFFF
            row[token_id // 32] &= clear - (1 << 32) if clear >= 1 << 31 else clear  # as a signed int32
    return row


def constraint_bytes(constraint: Constraint) -> int:
    """The UTF-8 size of a constraint's text (every choice together)."""
    texts = constraint.value if isinstance(constraint.value, tuple) else (constraint.value,)
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


class GrammarCache:
    """Compiled grammars by constraint; the least recently used are evicted while they hold more than `max_bytes`.
    Not thread-safe: its owner locks."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Constraint, tuple[xgr.CompiledGrammar, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, constraint: Constraint) -> xgr.CompiledGrammar | None:
        entry = self._entries.get(constraint)
        if entry is None:
            return None
        self._entries.move_to_end(constraint)
        return entry[0]

    def put(self, constraint: Constraint, compiled: xgr.CompiledGrammar, size: int) -> None:
        if (old := self._entries.pop(constraint, None)) is not None:
            self.bytes -= old[1]
        self._entries[constraint] = (compiled, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted


@dataclass(eq=False)
class _Flight:
    """One constraint's compile in progress, shared by every request that waits for it."""

    constraint: Constraint
    future: Future[xgr.CompiledGrammar] = field(default_factory=Future)
    waiters: int = 0
    job: CompileJob | None = None  # its vetting in a worker, when it has one


class Compilation:
    """One request's wait for a compiled grammar: `future` gets it (or InvalidRequestError); `release()` when the
    request stops waiting, which abandons the compile (killing its worker) if no other request waits for it."""

    def __init__(self, future: Future[xgr.CompiledGrammar], owner: ConstraintCompiler, flight: _Flight | None) -> None:
        self.future = future
        self._owner = owner
        self._flight = flight

    def release(self) -> None:
        flight, self._flight = self._flight, None
        if flight is not None:
            self._owner._release(flight)


class ConstraintCompiler:
    """Compiles constraints against one tokenizer, each once at a time, vetting new ones in killable workers;
    keeps what it compiled in a cache bounded by memory."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        config: StructuredOutputConfig | None = None,
    ) -> None:
        xgr = load_xgrammar()
        self.config = config or StructuredOutputConfig()
        # The model's vocab size, not the tokenizer's: logits rows may be padded past the last real token.
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self.cache = GrammarCache(self.config.cache_memory_bytes)
        self._flights: dict[Constraint, _Flight] = {}
        self._lock = threading.Lock()
        self._workers: CompileWorkers | None = None
        self._stopped = False
        # Compiles here run one per worker at most: a vetted compile takes about as long as it took there.
        self._compile_slots = threading.BoundedSemaphore(self.config.compile_workers)
        # Special tokens other than the stops are never part of a constrained output (xgrammar reads them as text).
        special = set(tokenizer.all_special_ids)
        special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
        self.allowed = allowed_row(vocab_size, sorted(special - set(self.stop_token_ids)))

    def cached(self, constraint: Constraint) -> xgr.CompiledGrammar | None:
        """The compiled grammar if it is cached (counts as a use)."""
        with self._lock:
            return self.cache.get(constraint)

    def compile(self, constraint: Constraint, vetted: bool = False) -> xgr.CompiledGrammar:
        """The compiled grammar, waiting for it; raises InvalidRequestError naming the kind for a bad or too costly
        constraint. `vetted`: the caller's server already vetted it (skip the worker)."""
        compilation = self.start(constraint, vetted)
        try:
            return compilation.future.result()
        finally:
            compilation.release()

    def start(self, constraint: Constraint, vetted: bool = False) -> Compilation:
        """Begin compiling (or join the compile of) a constraint; release the result when no longer waiting.
        Raises InvalidRequestError for a constraint over the limits, QueueFullError when too many wait."""
        with self._lock:
            compiled = self.cache.get(constraint)
        if compiled is not None:
            done: Future[xgr.CompiledGrammar] = Future()
            done.set_result(compiled)
            return Compilation(done, self, None)
        constraint.validate(self.config.limits)
        with self._lock:
            if self._stopped:
                raise CompileAbandoned("the server is stopping")
            flight = self._flights.get(constraint)
            new = flight is None
            if flight is None:
                flight = _Flight(constraint)
                if not (vetted or _certainly_cheap(constraint)):
                    flight.job = self._vetting().submit(constraint)  # may raise QueueFullError
                self._flights[constraint] = flight
            flight.waiters += 1
        if new:
            self._begin(flight)
        return Compilation(flight.future, self, flight)

    def new_state(self, constraint: Constraint) -> GrammarState:
        """A fresh matcher for one choice. Its constraint was vetted at admission (by this server, or by the server
        process in front of an engine-core process), so a cache miss compiles it here without a worker."""
        return GrammarState(load_xgrammar().GrammarMatcher(self.compile(constraint, vetted=True)))

    def shutdown(self) -> None:
        """Kill the workers; compiles in progress end with CompileAbandoned."""
        with self._lock:
            self._stopped = True
            workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown()

    def _vetting(self) -> CompileWorkers:
        if self._workers is None:
            config = self.config
            self._workers = CompileWorkers(
                self.info.serialize_json(),
                config.compile_workers,
                config.compile_timeout_s,
                config.compile_queue,
                config.worker_memory_bytes,
            )
            # An engine dropped without `shutdown` (tests make many) takes its workers with it.
            weakref.finalize(self, self._workers.shutdown)
        return self._workers

    def _begin(self, flight: _Flight) -> None:
        """Compile here once the worker's answer (if any) comes: on a thread of its own, never a waiter's."""
        job = flight.job
        if job is None:
            threading.Thread(target=self._finish, args=(flight, None), name="weir-grammar-compile", daemon=True).start()
        else:
            job.future.add_done_callback(
                lambda vetting: threading.Thread(
                    target=self._finish, args=(flight, vetting), name="weir-grammar-compile", daemon=True
                ).start()
            )

    def _finish(self, flight: _Flight, vetting: Future[Probe] | None) -> None:
        constraint = flight.constraint
        try:
            if vetting is not None:
                self._check_probe(constraint, vetting.result())
            with self._compile_slots:
                with self._lock:
                    if flight.waiters == 0:  # nobody waits: a request that comes later starts a new flight
                        self._drop(flight)
                        raise CompileAbandoned("nobody waits for this compile")
                compiled = compile_constraint(self._compiler, constraint)
            self._check_startable(constraint.kind, compiled)
        except Exception as error:  # handed to every waiter, who raises it
            if not isinstance(error, WeirError):
                logger.exception("compiling a %s constraint failed", constraint.kind)
            self._land(flight, None)
            flight.future.set_exception(error)
            return
        self._land(flight, compiled)
        flight.future.set_result(compiled)

    def _land(self, flight: _Flight, compiled: xgr.CompiledGrammar | None) -> None:
        """The flight is over: cache what it compiled and let the next request for its constraint start afresh."""
        constraint = flight.constraint
        with self._lock:
            self._drop(flight)
            if compiled is not None:
                size = compiled.memory_size_bytes + constraint_bytes(constraint) + _ENTRY_OVERHEAD_BYTES
                self.cache.put(constraint, compiled, size)

    def _release(self, flight: _Flight) -> None:
        """A request stopped waiting. The last one to go ends the compile while it is in a worker; a compile here
        (vetted, so bounded) finishes and is cached, unless it has not started yet."""
        with self._lock:
            flight.waiters -= 1
            job = flight.job
            if flight.waiters > 0 or flight.future.done() or job is None or job.future.done():
                return
            self._drop(flight)
        job.cancel()

    def _drop(self, flight: _Flight) -> None:
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

    def _check_startable(self, kind: str, compiled: xgr.CompiledGrammar) -> None:
        """Refuse a constraint no token of this vocabulary can begin (a regex of characters the tokenizer lacks,
        say): otherwise every token would be masked and the request would fail mid-step."""
        xgr = load_xgrammar()
        first = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(first, 0)
        if not bool((first[0] & self.allowed).any()):
            raise InvalidRequestError(kind, "no token of this model's vocabulary can begin an output it allows")


class GrammarState:
    """One choice's position in its grammar; advanced with every token the choice accepts."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def _certainly_cheap(constraint: Constraint) -> bool:
    if constraint.kind == "json_object":
        return True
    return constraint.kind == "choice" and constraint_bytes(constraint) <= CHEAP_CHOICE_BYTES
