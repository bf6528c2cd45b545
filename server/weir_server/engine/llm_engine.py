"""The synchronous engine core: one `step()` is schedule -> run -> sample -> update -> detokenize -> outputs."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import torch

from weir_server.config import EngineConfig
from weir_server.distributed import parallel_state
from weir_server.engine.block_manager import BlockManager
from weir_server.engine.detokenizer import IncrementalDetokenizer
from weir_server.engine.output_text import core_makes_text
from weir_server.engine.sampler import Sampler, make_generator, token_logprobs
from weir_server.engine.scheduler import Scheduler, SchedulerOutput
from weir_server.engine.sequence import Sequence, SequenceStatus
from weir_server.engine.stats import EngineStats
from weir_server.engine.structured import StructuredOutputs
from weir_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestTiming,
    TokenLogprob,
    Usage,
)
from weir_server.engine.validation import RequestValidator
from weir_server.errors import EngineStepError
from weir_server.executor.model_runner import ModelOutput, ModelRunner, TokenFeed

if TYPE_CHECKING:
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)

# Finish reasons given by aborts and failures, which hand out the choice's last output themselves.
_ENDED_ELSEWHERE = (FinishReason.CANCELLED, FinishReason.ERROR)


@dataclasses.dataclass(slots=True)
class _Launched:
    """A step whose sampled tokens are still on the device: which placeholder each one fills."""

    seqs: list[Sequence]
    indices: list[int]  # the placeholder's index in each sequence's token_ids
    tokens: torch.Tensor  # [S] on the model's device
    logprobs: list[TokenLogprob | None]
    host: torch.Tensor | None = None  # pinned copy being filled, and the event that says it is
    ready: torch.cuda.Event | None = None

    def token_list(self) -> list[int]:
        if self.ready is None:
            return self.tokens.tolist()
        self.ready.synchronize()
        assert self.host is not None
        return self.host.tolist()


@dataclasses.dataclass(slots=True)
class _Deferred:
    """A sampled token of a choice whose text and output are made later."""

    seq: Sequence
    token_ids: list[int]  # what the detokenizer gets: empty for a stop token whose text is dropped
    finished: bool
    can_stop: bool  # min_tokens reached: stop strings count


class LLMEngine:
    """Owns the scheduler, model runner, sampler and every live sequence; not thread-safe (one caller)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = tuple(loaded.eos_token_ids)
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.vocab_size
        self.runner = ModelRunner(loaded, config)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sampler = Sampler()
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids, self.runner.device)
        # A sequence can never outgrow the whole KV pool, so that is a context limit too.
        self.max_seq_len = min(self.max_model_len, self.block_manager.num_total_blocks * config.cache.block_size)
        self.validator = RequestValidator(self.vocab_size, self.max_model_len, self.max_seq_len, self.structured)
        self.num_steps = 0
        self.num_generated_tokens = 0
        # Overlap pays only where the model runs asynchronously to the host; the CPU runs each step to the end.
        self.overlap_outputs = self.runner.device.type == "cuda"
        self._deferred: list[_Deferred] = []  # sampled tokens whose text and output are still to be made
        # False in an engine-core process: text is made by the server process (`OutputText`), in parallel, except
        # for choices with stop strings, which must end here when one appears.
        self.detokenize_all = True
        # Run ahead: launch step N+1 before step N's tokens are read back (its inputs come from them on the
        # device), so scheduling, input preparation and output work overlap the GPU. Only where the model runs
        # asynchronously and on one rank (tensor-parallel workers get token ids from the host).
        self.run_ahead = config.executor.run_ahead and self.overlap_outputs and parallel_state.tp_size() == 1
        self._launched: _Launched | None = None  # the step running ahead, tokens not yet read

    # ---- requests ---------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Check a request against the model; return it with max_tokens clamped to the context left."""
        return self.validator.validate(request)

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a validated request as `n` sequences (siblings share the prompt's cached blocks)."""
        params = request.params
        prompt = list(request.prompt_token_ids)
        share = (
            params.n > 1 and self.block_manager.enable_prefix_caching and len(prompt) > self.block_manager.block_size
        )
        seqs: list[Sequence] = []
        for index in range(params.n):
            leader = seqs[0] if share and seqs else None
            seq = Sequence(request.request_id, index, prompt, params, request.arrival_time, leader=leader)
            seq.length_limit = min(seq.length_limit, self.max_seq_len)
            if params.seed is not None and self.sampler.uses_generators(self.runner.device):
                seq.generator = make_generator(params.seed, index, self.runner.device)
            if self.tokenizer is not None and (self.detokenize_all or core_makes_text(request)):
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, params)
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [TokenLogprob(prompt[0], None)]
            if request.constraint is not None:
                seq.grammar = self.structured.new_state(request.constraint)
            seqs.append(seq)
        self.scheduler.add(seqs)

    def abort_request(self, request_id: str) -> list[GenerationOutput]:
        """Cancel a request's unfinished choices at once, freeing their blocks."""
        return [self._output(seq, "") for seq in self.scheduler.abort(request_id)]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._deferred) or self._launched is not None

    # ---- the step -----------------------------------------------------------------------------------------

    def step(self) -> list[GenerationOutput]:
        """Run one iteration; a failure in the model fails only this step's requests.

        With `overlap_outputs` the outputs of the tokens sampled in one step are detokenized and built in the
        next, while its model runs on the device; a stop string found then wastes that step's token of its choice.
        With `run_ahead` the next step is also scheduled and launched before this step's tokens are read back.
        """
        output = self.scheduler.schedule()
        outputs: list[GenerationOutput] = []
        ahead = self._launched
        in_flight = ahead is not None
        self._launched = None
        runs_ahead = self.run_ahead and self._can_run_ahead(output)
        if ahead is not None and not runs_ahead:
            # This batch needs the tokens on the host first (penalties, constraints, logprobs): read them now and
            # drop the sequences they ended.
            outputs += self._take(ahead)
            output.scheduled = [s for s in output.scheduled if not s.seq.is_finished]
            ahead = None
            runs_ahead = self._can_run_ahead(output)
        if output.is_empty:
            if ahead is not None:
                outputs += self._take(ahead)
            # Scheduled while tokens were in flight, an empty batch says nothing about what fits: next step.
            unschedulable = [] if in_flight else self._fail_unschedulable()
            return outputs + self._flush() + unschedulable
        self.num_steps += 1
        launched: _Launched | None = None
        try:
            # Constrained rows' token masks are filled on a helper thread while the model runs.
            mask = self.structured.submit([s.seq.grammar for s in output.scheduled if s.do_sample])
            feed = TokenFeed(ahead.tokens, {seq.seq_id: i for i, seq in enumerate(ahead.seqs)}) if ahead else None
            result = self.runner.execute(output.scheduled, feed)
            self._record_prompt_logprobs(result)
            sample_seqs = [s.seq for s in result.sample_seqs]
            if sample_seqs:
                tokens, logprobs = self.sampler.sample(
                    result.sample_logits, sample_seqs, self.eos_token_ids, mask.result() if mask else None
                )
                launched = self._launch_readback(sample_seqs, tokens, logprobs)
            if ahead is not None:
                outputs += self._take(ahead)  # the previous step's tokens, while this one runs
            self.scheduler.update(output)
            if self.overlap_outputs:
                outputs += self._flush()  # the host's share of earlier steps, while the device computes
        except Exception as error:  # any failure of the model must not stop the engine
            logger.exception("engine step failed; failing the %d requests in it", len(output.scheduled))
            failed = [s.seq for s in output.scheduled] + (ahead.seqs if ahead is not None else [])
            message = f"{type(error).__name__}: {error}"
            return outputs + self._flush() + self.fail_requests([seq.request_id for seq in failed], message)
        if launched is not None and runs_ahead:
            self._launched = launched  # read back next step
        elif launched is not None:
            outputs += self._take(launched)
        if not self.overlap_outputs:
            outputs += self._flush()
        return outputs

    def _can_run_ahead(self, output: SchedulerOutput) -> bool:
        """Whether a batch can be launched while the previous step's tokens are unread, and itself run ahead:
        nothing in it reads its own output tokens on the host before sampling."""
        for s in output.scheduled:
            seq = s.seq
            params = seq.params
            if (
                seq.grammar is not None
                or params.logprobs is not None
                or seq.wants_prompt_logprobs
                or params.repetition_penalty != 1.0
                or params.presence_penalty != 0.0
                or params.frequency_penalty != 0.0
            ):
                return False
        return True

    def _launch_readback(
        self, seqs: list[Sequence], tokens: torch.Tensor, logprobs: list[TokenLogprob | None]
    ) -> _Launched:
        """Take each sampled sequence's next slot and start copying the tokens to the host."""
        launched = _Launched(seqs, [seq.add_placeholder() for seq in seqs], tokens, logprobs)
        if tokens.device.type == "cuda":
            launched.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            launched.host.copy_(tokens, non_blocking=True)
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        return launched

    def _take(self, launched: _Launched) -> list[GenerationOutput]:
        """Read a launched step's tokens back and add them to their sequences (ending some of them)."""
        outputs: list[GenerationOutput] = []
        finished = SequenceStatus.FINISHED
        token_ids = launched.token_list()
        rows = zip(launched.seqs, launched.indices, token_ids, launched.logprobs, strict=True)
        for seq, index, token_id, logprob in rows:
            if seq.status is finished:  # aborted, failed, or ended by a stop string found late
                continue
            self.num_generated_tokens += 1
            try:
                self._append(seq, index, token_id, logprob)
            except Exception as error:  # a constraint failure ends this request only
                logger.exception("post-processing request %s failed", seq.request_id)
                outputs += self.fail_requests([seq.request_id], f"{type(error).__name__}: {error}")
        return outputs

    def _record_prompt_logprobs(self, result: ModelOutput) -> None:
        for scheduled, logits in result.prompt_logits:
            seq, start = scheduled.seq, scheduled.start
            assert seq.prompt_logprobs is not None and seq.params.prompt_logprobs is not None
            targets = torch.tensor(seq.token_ids[start + 1 : start + 1 + logits.shape[0]], device=logits.device)
            entries = token_logprobs(
                torch.log_softmax(logits, dim=-1), targets, [seq.params.prompt_logprobs] * len(targets)
            )
            for offset, entry in enumerate(entries):
                if start + 1 + offset == len(seq.prompt_logprobs):  # positions recomputed after preemption are known
                    seq.prompt_logprobs.append(entry)

    def _append(self, seq: Sequence, index: int, token_id: int, logprob: TokenLogprob | None) -> None:
        """Fill a sampled token's placeholder and end the choice on a stop token or its length; the text and the
        output follow in `_flush` (a stop string can still end it there)."""
        seq.set_token(index, token_id, logprob)
        params = seq.params
        grammar = seq.grammar
        num_output = index + 1 - seq.num_prompt_tokens  # a later token may already be in flight
        reason: FinishReason | None = None
        if grammar is not None and not grammar.accept(token_id):
            raise EngineStepError(f"the output constraint does not allow token {token_id} here")
        can_stop = num_output >= params.min_tokens
        if grammar is not None and grammar.is_terminated:  # complete, and its stop token taken
            reason = FinishReason.STOP
        elif can_stop and (
            token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
        ):
            reason = FinishReason.STOP
        elif num_output >= params.max_tokens or index + 1 >= self.max_seq_len:
            reason = FinishReason.LENGTH
        # A stop token's own text is not part of the answer unless asked.
        keep = reason is not FinishReason.STOP or params.include_stop_str_in_output
        if reason is not None:
            seq.finish(reason)
            self.scheduler.finish(seq)
        self._deferred.append(_Deferred(seq, [token_id] if keep else [], reason is not None, can_stop))

    def _flush(self) -> list[GenerationOutput]:
        """Detokenize the sampled tokens not yet handed out, look for stop strings, and build their outputs."""
        deferred, self._deferred = self._deferred, []
        outputs: list[GenerationOutput] = []
        for item in deferred:
            seq = item.seq
            if seq.finish_reason in _ENDED_ELSEWHERE:  # cancelled or failed since: its last output is out
                continue
            try:
                outputs.append(self._text_output(item))
            except Exception as error:  # a detokenizer failure ends this request only
                logger.exception("post-processing request %s failed", seq.request_id)
                message = f"{type(error).__name__}: {error}"
                if seq.is_finished:  # ended by its last token, so no longer running: fail it here
                    seq.finish(FinishReason.ERROR, error=message)
                    outputs.append(self._output(seq, ""))
                outputs += self.fail_requests([seq.request_id], message)
        return outputs

    def _text_output(self, item: _Deferred) -> GenerationOutput:
        seq = item.seq
        text = ""
        detokenizer = seq.detokenizer
        if detokenizer is not None:
            text, stop_str = detokenizer.add(item.token_ids, item.finished, check_stop=item.can_stop)
            if stop_str is not None:
                running = not seq.is_finished
                seq.finish(FinishReason.STOP_SEQUENCE, stop_str)
                if running:
                    self.scheduler.finish(seq)
        if seq.is_finished:
            return self._output(seq, text)
        # The common case: a plain delta, no usage or timing yet.
        out = GenerationOutput(
            seq.request_id,
            seq.index,
            text,
            seq.pending_token_ids,
            seq.pending_logprobs if seq.params.logprobs is not None else None,
            self._take_prompt_logprobs(seq),
        )
        seq.pending_token_ids, seq.pending_logprobs = [], []
        return out

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
        """The prompt logprobs on a choice's first output only."""
        if seq.prompt_logprobs is None or seq.prompt_logprobs_sent:
            return None
        seq.prompt_logprobs_sent = True
        return seq.prompt_logprobs

    def _output(self, seq: Sequence, text: str) -> GenerationOutput:
        out = GenerationOutput(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=seq.pending_token_ids,
            logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=self._take_prompt_logprobs(seq),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            usage=self._usage(seq) if seq.is_finished else None,
            error=seq.error,
            timing=self._timing(seq) if seq.is_finished else None,
        )
        seq.pending_token_ids, seq.pending_logprobs = [], []
        return out

    @staticmethod
    def _timing(seq: Sequence) -> RequestTiming:
        return RequestTiming(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, time.time())

    @staticmethod
    def _usage(seq: Sequence) -> Usage:
        return Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens)

    def _fail_unschedulable(self) -> list[GenerationOutput]:
        """Nothing runs yet requests wait: the head can never fit (validation should prevent it); fail it."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        head = self.scheduler.waiting[0]
        logger.error("request %s cannot be scheduled with an empty engine; failing it", head.request_id)
        message = f"the request needs more KV cache than the engine has ({self.block_manager.num_total_blocks} blocks)"
        return self.fail_requests([head.request_id], message)

    def _fail_step(self, output: SchedulerOutput, message: str) -> list[GenerationOutput]:
        return self.fail_requests([s.seq.request_id for s in output.scheduled], message)

    def fail_requests(self, request_ids: list[str], message: str) -> list[GenerationOutput]:
        """Finish every unfinished choice of these requests with ERROR, freeing their blocks."""
        outputs: list[GenerationOutput] = []
        for request_id in dict.fromkeys(request_ids):
            for seq in self.scheduler.abort(request_id, FinishReason.ERROR):
                seq.error = message
                outputs.append(self._output(seq, ""))
        return outputs

    def stats(self) -> EngineStats:
        """A snapshot of queue, cache and throughput counters."""
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            block_size=bm.block_size,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queried_tokens=bm.prefix_queried_tokens,
            prefix_cache_hit_tokens=bm.prefix_hit_tokens,
            num_steps=self.num_steps,
            num_generated_tokens=self.num_generated_tokens,
        )
