"""Iteration-level continuous batching: a token budget per step, chunked prefill, preemption by recompute."""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from dataclasses import dataclass

from weir_server.config import SchedulerConfig
from weir_server.engine.block_manager import BlockManager
from weir_server.engine.lora_manager import NO_SLOT, LoRAManager
from weir_server.engine.sequence import Sequence, SequenceStatus
from weir_server.engine.types import FinishReason
from weir_server.errors import QueueFullError
from weir_server.executor.batch import ScheduledSeq


@dataclass
class SchedulerOutput:
    """Who runs this step, in batch order."""

    scheduled: list[ScheduledSeq[Sequence]]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def check_in_flight(config: SchedulerConfig, in_flight: int) -> None:
    """Raise QueueFullError when `in_flight` requests (running + waiting) already fill the engine: the one
    admission rule, applied by the scheduler itself and by the server in front of an engine-core process."""
    if in_flight >= config.max_num_seqs + config.max_waiting:
        raise QueueFullError(f"the waiting queue is full ({config.max_waiting} requests); retry later")


class Scheduler:
    """Decides which sequences run each step; never touches tensors."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, lora: LoRAManager | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.lora = lora  # the adapters' device slots; a sequence runs only while its adapter holds one
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # ordered by arrival (seq_id), so the newest is last
        self._waiting_requests: Counter[str] = Counter()
        self.num_preemptions = 0

    @property
    def num_waiting_requests(self) -> int:
        return len(self._waiting_requests)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_capacity(self, num_pending: int = 0) -> None:
        """Raise QueueFullError when the engine holds max_num_seqs + max_waiting requests (counting `num_pending`
        not yet added): a burst of that many arriving between two steps is accepted whole, and a preemption
        (running -> waiting) changes nothing."""
        check_in_flight(self.config, len(self.running) + self.num_waiting_requests + num_pending)

    def add(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences at the back."""
        for seq in seqs:
            self._push_waiting(seq, front=False)

    def _push_waiting(self, seq: Sequence, front: bool) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        self._waiting_requests[seq.request_id] += 1

    def _pop_waiting(self) -> Sequence:
        seq = self.waiting.popleft()
        self._uncount_waiting(seq)
        return seq

    def _uncount_waiting(self, seq: Sequence) -> None:
        self._waiting_requests[seq.request_id] -= 1
        if not self._waiting_requests[seq.request_id]:
            del self._waiting_requests[seq.request_id]

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch: running decodes, then running prefill chunks, then new admissions."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[int, ScheduledSeq[Sequence]] = {}
        preempted = False
        bs = self.block_manager.block_size
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for seq in self.running:
            num_tokens = len(seq.token_ids)
            if num_tokens >= seq.length_limit:  # its last token is still in flight: it ends when that arrives
                continue
            (decodes if seq.num_computed_tokens + 1 == num_tokens else prefills).append(seq)
        running = SequenceStatus.RUNNING
        for group in (decodes, prefills):
            for seq in group:
                if seq.status is not running:  # preempted for an earlier one this step
                    continue
                if budget == 0:
                    break
                # The common case, kept lean: a decode whose last block still has a free slot.
                if group is decodes and len(seq.block_table) * bs > seq.num_computed_tokens:
                    scheduled[seq.seq_id] = ScheduledSeq(seq, 1, seq.num_computed_tokens)
                    budget -= 1
                    continue
                num_new = min(seq.num_uncomputed_tokens, budget)
                while not self.block_manager.can_allocate(seq, num_new):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted = True
                    freed = scheduled.pop(victim.seq_id, None)
                    if freed is not None:
                        budget += freed.num_new_tokens
                    if victim is seq:
                        break
                if seq.status is running:
                    self.block_manager.allocate(seq, num_new)
                    scheduled[seq.seq_id] = ScheduledSeq(seq, num_new, seq.num_computed_tokens)
                    budget -= num_new
        if not preempted:  # memory is tight when we just preempted: admit nobody this step
            budget = self._admit(scheduled, budget)
        return SchedulerOutput(list(scheduled.values()))

    def _admit(self, scheduled: dict[int, ScheduledSeq[Sequence]], budget: int) -> int:
        """Move waiting sequences to running in FIFO order while budget, seats and blocks last."""
        bm, lora = self.block_manager, self.lora
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            adapter = seq.adapter
            # A sibling waiting for its leader, or an adapter that finds no free slot: later ones may go first.
            if not seq.ready_to_admit() or (adapter is not None and lora is not None and not lora.can_acquire(adapter)):
                deferred.append(self._pop_waiting())
                continue
            hits = bm.lookup_prefix(seq)
            remaining = seq.num_tokens - len(hits) * bm.block_size
            if self.config.enable_chunked_prefill:
                num_new = min(remaining, budget)
            elif remaining <= budget or not scheduled:  # an oversized prompt runs alone rather than never
                num_new = remaining
            else:
                break
            if not bm.can_admit(seq, hits, num_new):
                break
            self._pop_waiting()
            cached = bm.admit(seq, hits)
            if not seq.admitted:
                seq.admitted, seq.num_cached_tokens = True, cached
                seq.first_scheduled_time = time.time()
            bm.allocate(seq, num_new)
            if adapter is not None and lora is not None:
                seq.lora_slot = lora.acquire(adapter)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)
            scheduled[seq.seq_id] = ScheduledSeq(seq, num_new, seq.num_computed_tokens)
            budget -= num_new
        for seq in reversed(deferred):
            self._push_waiting(seq, front=True)
        return budget

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it at the front; it is recomputed later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._leave_slot(seq)
        self._push_waiting(seq, front=True)
        self.num_preemptions += 1

    def _leave_slot(self, seq: Sequence) -> None:
        """A sequence left the device: its adapter's slot may go to another adapter once no one else runs it."""
        if seq.lora_slot != NO_SLOT and seq.adapter is not None and self.lora is not None:
            self.lora.release(seq.adapter)
            seq.lora_slot = NO_SLOT

    def _forget_adapter(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            seq.adapter.sequences.discard(seq.seq_id)

    def update(self, output: SchedulerOutput) -> None:
        """Account a launched step: the scheduled tokens now have KV, and full blocks enter the prefix cache.
        Sequences that ended meanwhile (a token sampled by the step before, read back since) are skipped."""
        commit = self.block_manager.commit
        running = SequenceStatus.RUNNING
        for s in output.scheduled:
            if s.seq.status is running:
                s.seq.num_computed_tokens += s.num_new_tokens
                commit(s.seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished sequence: running, or preempted while its last token was in flight."""
        assert seq.is_finished
        self._forget_adapter(seq)
        if seq.request_id in self._waiting_requests and seq in self.waiting:  # its blocks went at preemption
            self.waiting.remove(seq)
            self._uncount_waiting(seq)
            return
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._leave_slot(seq)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> list[Sequence]:
        """Remove every unfinished sequence of a request, free its blocks, and return them."""
        aborted = [s for s in self.running if s.request_id == request_id]
        for seq in aborted:
            self.running.remove(seq)
            self.block_manager.free(seq)
            self._leave_slot(seq)
        if request_id in self._waiting_requests:
            kept = deque(s for s in self.waiting if s.request_id != request_id)
            aborted += [s for s in self.waiting if s.request_id == request_id]
            self.waiting = kept
            del self._waiting_requests[request_id]
        for seq in aborted:
            seq.finish(reason)
            self._forget_adapter(seq)
        return aborted
