"""EngineCore: one `step()` is schedule -> launch (run, sample) -> read back -> update -> outputs; and its busy loop.

The loop (`CoreLoop`) is the same wherever the core runs: on a thread of the server process or as the main loop of
a core process (`core_process`). Only where its outputs go differs: `deliver` decides.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from weir_server.config import EngineConfig
from weir_server.engine.block_manager import BlockManager
from weir_server.engine.detokenizer import IncrementalDetokenizer
from weir_server.engine.kv_events import KvEvent
from weir_server.engine.lora_manager import LoadedAdapter, LoRAManager, check_adapter_name
from weir_server.engine.output import PendingText, choice_output, core_makes_text, final_output, make_text
from weir_server.engine.sampler import Sampler, make_generator, token_logprobs
from weir_server.engine.scheduler import Scheduler, SchedulerOutput
from weir_server.engine.sequence import Sequence, SequenceStatus
from weir_server.engine.spec_decode.draft_model import kv_bytes_per_block
from weir_server.engine.spec_decode.factory import create_spec_decoder, load_spec_draft
from weir_server.engine.stats import EngineStats
from weir_server.engine.stop import check_stop, may_stop
from weir_server.engine.structured import StructuredOutputs
from weir_server.engine.types import AdapterInfo, FinishReason, GenerationOutput, GenerationRequest, TokenLogprob
from weir_server.engine.validation import RequestValidator
from weir_server.errors import EngineStepError, EngineUnavailableError, InvalidRequestError, ModelLoadError, WeirError
from weir_server.executor.batch import StepPublisher
from weir_server.executor.lora_checkpoint import read_peft_adapter
from weir_server.executor.model_runner import ModelOutput, ModelRunner, TokenFeed
from weir_server.executor.tp_executor import launch
from weir_server.models.loader import load_model

if TYPE_CHECKING:
    from weir_server.engine.spec_decode.decoder import SampledRun
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)

# Finish reasons given by aborts and failures, which hand out the choice's last output themselves.
_ENDED_ELSEWHERE = (FinishReason.CANCELLED, FinishReason.ERROR)
_GIL_SWITCH_INTERVAL_S = 0.0005


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
            tokens: list[int] = self.tokens.tolist()
            return tokens
        self.ready.synchronize()
        assert self.host is not None
        host: list[int] = self.host.tolist()
        return host


class EngineCore:
    """Owns the scheduler, model runner, sampler and every live sequence; not thread-safe (one caller).

    `detokenize_all=False`: the core makes only the text of choices with stop strings, which must end here when one
    appears; the front end in the server process makes the rest (`OutputText`), in parallel with the next steps.
    `publisher`: rank 0 of a tensor-parallel group hands each batch to the workers through it (`launch`).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        *,
        detokenize_all: bool = True,
        publisher: StepPublisher | None = None,
    ) -> None:
        if config.parallel.tensor_parallel_size > 1 and publisher is None:
            raise ValueError("a tensor-parallel core needs its workers' publisher (`from_config` starts them)")
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = tuple(loaded.eos_token_ids)
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.vocab_size
        self.detokenize_all = detokenize_all
        # A draft model is loaded first: the KV cache is sized around its weights and its cache.
        draft = load_spec_draft(config, loaded)
        shared = kv_bytes_per_block(draft, config.cache.block_size) if draft is not None else 0
        self.runner = ModelRunner(loaded, config, publisher, shared_block_bytes=shared)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.lora = LoRAManager(config.lora, self.runner.load_lora) if config.lora is not None else None
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.lora)
        self.sampler = Sampler(config.model.sampling_seed)
        self.structured = StructuredOutputs(
            self.tokenizer, self.vocab_size, self.eos_token_ids, self.runner.device, config.structured
        )
        # A sequence can never outgrow the whole KV pool, so that is a context limit too.
        self.max_seq_len = min(self.max_model_len, self.block_manager.num_total_blocks * config.cache.block_size)
        self.validator = RequestValidator(self.vocab_size, self.max_model_len, self.max_seq_len, self.structured)
        self.num_steps = 0
        self.num_generated_tokens = 0
        # Overlap pays only where the model runs asynchronously to the host; the CPU runs each step to the end.
        self.overlap_outputs = self.runner.device.type == "cuda"
        self._pending_text: list[PendingText] = []  # sampled tokens whose text and output are still to be made
        # Run ahead: launch step N+1 before step N's tokens are read back (its inputs come from them on the
        # device), so scheduling, input preparation and output work overlap the GPU. Only where the model runs
        # asynchronously and on one rank (tensor-parallel workers get token ids from the host).
        self.run_ahead = config.executor.run_ahead and self.overlap_outputs and publisher is None
        self._launched: _Launched | None = None  # the step running ahead, tokens not yet read
        self._load_startup_adapters()
        # Speculative decoding reads each step's tokens on the host to propose the next: it runs ahead only while
        # it backs off (a large batch proposes nothing).
        self.spec = create_spec_decoder(config, draft, self.runner.num_blocks)

    @classmethod
    def from_config(cls, config: EngineConfig, detokenize_all: bool = True) -> EngineCore:
        """Start `config`'s tensor-parallel workers (none at size 1), load the model as their rank 0 and build its
        core; blocking. How a core process, and a server's core thread, make their core."""
        publisher = launch(config)  # before the model is built, so it is built as rank 0's shard
        loaded = load_model(config.model, "generate", lora=config.lora is not None)
        return cls(loaded, config, detokenize_all=detokenize_all, publisher=publisher)

    # ---- LoRA adapters ----------------------------------------------------------------------------------

    def read_adapter(self, name: str, path: str) -> LoadedAdapter:
        """Read and check a PEFT adapter against the model (thread-safe: touches no engine state); raise
        InvalidRequestError naming the problem."""
        lora = self.config.lora
        if lora is None:
            raise InvalidRequestError("", "LoRA adapters are not enabled on this server (start it with --enable-lora)")
        check_adapter_name(name, self.loaded.model_id)
        if self.lora is not None and name in self.lora.adapters:
            raise InvalidRequestError("name", f"an adapter named {name!r} is already loaded")
        weights = read_peft_adapter(path, self.runner.lora_spec, lora.max_lora_rank)
        info = AdapterInfo(name, path, weights.rank, weights.alpha, weights.target_modules, self.loaded.model_id)
        return LoadedAdapter(info, weights, weights.digest)

    def add_adapter(self, adapter: LoadedAdapter) -> AdapterInfo:
        """Serve a read adapter under its name (not thread-safe: the core's own thread)."""
        assert self.lora is not None, "read_adapter refuses adapters while LoRA is off"
        self.lora.add(adapter)
        logger.info("LoRA adapter %r loaded from %s (rank %d)", adapter.info.name, adapter.info.path, adapter.info.rank)
        return adapter.info

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter: refused from now on; its requests in flight finish, then its memory goes."""
        if self.lora is None:
            raise InvalidRequestError("", "LoRA adapters are not enabled on this server (start it with --enable-lora)")
        self.lora.remove(name)
        logger.info("LoRA adapter %r unloaded", name)

    def adapters(self) -> list[AdapterInfo]:
        return self.lora.infos() if self.lora is not None else []

    def _load_startup_adapters(self) -> None:
        for name, path in self.config.lora.lora_modules if self.config.lora is not None else ():
            try:
                self.add_adapter(self.read_adapter(name, path))
            except WeirError as error:
                raise ModelLoadError(f"--lora-modules {name}={path}: {error}") from error

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
        makes_text = self.tokenizer is not None and core_makes_text(request, self.detokenize_all)
        adapter = self._adapter_of(request)
        seqs: list[Sequence] = []
        for index in range(params.n):
            leader = seqs[0] if share and seqs else None
            seq = Sequence(
                request.request_id, index, prompt, params, request.arrival_time, leader, self.eos_token_ids, adapter
            )
            if adapter is not None:
                adapter.sequences.add(seq.seq_id)
            seq.length_limit = min(seq.length_limit, self.max_seq_len)
            if params.seed is not None and self.sampler.uses_generators(self.runner.device):
                seq.generator = make_generator(params.seed, index, self.runner.device)
            if makes_text:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, params)
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [TokenLogprob(prompt[0], None)]
            if request.constraint is not None:
                seq.grammar = self.structured.new_state(request.constraint)
            seqs.append(seq)
        self.scheduler.add(seqs)

    def _adapter_of(self, request: GenerationRequest) -> LoadedAdapter | None:
        """The request's adapter; raises NotFoundError for one not loaded (the front end checks first)."""
        if request.adapter is None:
            return None
        if self.lora is None:
            raise InvalidRequestError("adapter", "LoRA adapters are not enabled on this server")
        return self.lora.get(request.adapter)

    def refuse_request(self, request: GenerationRequest, message: str) -> list[GenerationOutput]:
        """The final outputs of a request the core cannot queue (its adapter went away meanwhile)."""
        outputs = []
        for index in range(request.params.n):
            seq = Sequence(
                request.request_id, index, list(request.prompt_token_ids), request.params, request.arrival_time
            )
            seq.finish(FinishReason.ERROR, error=message)
            outputs.append(final_output(seq))
        return outputs

    def collect_adapters(self) -> None:
        """Free the memory of unloaded adapters whose last request has ended."""
        if self.lora is not None:
            self.lora.collect()

    def abort_request(self, request_id: str) -> list[GenerationOutput]:
        """Cancel a request's unfinished choices at once, freeing their blocks."""
        return [final_output(seq) for seq in self.scheduler.abort(request_id)]

    def fail_requests(self, request_ids: list[str], message: str) -> list[GenerationOutput]:
        """Finish every unfinished choice of these requests with ERROR, freeing their blocks."""
        outputs: list[GenerationOutput] = []
        for request_id in dict.fromkeys(request_ids):
            for seq in self.scheduler.abort(request_id, FinishReason.ERROR):
                seq.error = message
                outputs.append(final_output(seq))
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_text) or self._launched is not None

    # ---- the step -----------------------------------------------------------------------------------------

    def step(self) -> list[GenerationOutput]:
        """Run one iteration; a failure in the model fails only this step's requests.

        With `overlap_outputs` the outputs of the tokens sampled in one step are detokenized and built in the
        next, while its model runs on the device; a stop string found then wastes that step's token of its choice.
        With `run_ahead` the next step is also scheduled and launched before this step's tokens are read back.
        """
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        output = self.scheduler.schedule()
        if self.spec is not None:
            self.spec.fit(output)
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
            if self.spec is not None and self.spec.has_drafts:
                runs = self.spec.sample(result, self.sampler, self.eos_token_ids, mask.result() if mask else None)
                outputs += self._append_runs(runs)  # before `update`: it commits only the accepted tokens' blocks
            elif sample_seqs:
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
        nothing in it reads its own output tokens on the host before sampling, and speculation backs off (the next
        step's proposals need this step's tokens on the host; a sequence with a token in flight gets none)."""
        if self.spec is not None and not self.spec.backed_off:
            return False
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
            launched.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves __init__ untyped
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

    def _append_runs(self, runs: list[SampledRun]) -> list[GenerationOutput]:
        """Add each sequence's tokens of a speculative step one by one, as if sampled in turn: a stop token, the
        length limit or (for choices with stop strings, whose text is made at once) a stop string ends the run."""
        outputs: list[GenerationOutput] = []
        for run in runs:
            seq = run.seq
            first = len(self._pending_text)
            text_each = bool(seq.params.stop) and len(run.token_ids) > 1
            for token_id, logprob in zip(run.token_ids, run.logprobs, strict=True):
                if seq.is_finished:
                    break
                self.num_generated_tokens += 1
                try:
                    self._append(seq, seq.add_placeholder(), token_id, logprob)
                    if text_each:
                        outputs += self._flush()
                except Exception as error:  # a constraint failure ends this request only
                    logger.exception("post-processing request %s failed", seq.request_id)
                    outputs += self.fail_requests([seq.request_id], f"{type(error).__name__}: {error}")
            if not text_each and len(self._pending_text) - first > 1:  # one output for the run, as for a token
                items = self._pending_text[first:]
                merged = [t for item in items for t in item.token_ids]
                self._pending_text[first:] = [PendingText(seq, merged, items[-1].finished, items[-1].can_stop)]
        return outputs

    def _record_prompt_logprobs(self, result: ModelOutput[Sequence]) -> None:
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
        """Fill a sampled token's placeholder and end the choice by its stop rules; the text and the output follow
        in `_flush` (a stop string can still end it there)."""
        seq.set_token(index, token_id, logprob)
        if seq.grammar is not None and not seq.grammar.accept(token_id):
            raise EngineStepError(f"the output constraint does not allow token {token_id} here")
        reason = check_stop(seq, index)
        # A stop token's own text is not part of the answer unless asked.
        keep = reason is not FinishReason.STOP or seq.params.include_stop_str_in_output
        if reason is not None:
            seq.finish(reason)
            self.scheduler.finish(seq)
        # Stop strings are looked for only in the text made here.
        can_stop = seq.detokenizer is not None and may_stop(seq, index)
        self._pending_text.append(PendingText(seq, [token_id] if keep else [], reason is not None, can_stop))

    def _flush(self) -> list[GenerationOutput]:
        """Make the text of the sampled tokens not yet handed out (a stop string may end a choice) and their
        outputs."""
        pending, self._pending_text = self._pending_text, []
        outputs: list[GenerationOutput] = []
        for item in pending:
            seq = item.seq
            if seq.finish_reason in _ENDED_ELSEWHERE:  # cancelled or failed since: its last output is out
                continue
            try:
                if seq.detokenizer is None:  # its text is made in front of the core, so no stop string ends it here
                    outputs.append(choice_output(seq, ""))
                    continue
                running = not seq.is_finished
                text = make_text(item)
                if running and seq.is_finished:  # a stop string ended it
                    self.scheduler.finish(seq)
                outputs.append(choice_output(seq, text))
            except Exception as error:  # a detokenizer failure ends this request only
                logger.exception("post-processing request %s failed", seq.request_id)
                message = f"{type(error).__name__}: {error}"
                if seq.is_finished:  # ended by its last token, so no longer running: fail it here
                    seq.finish(FinishReason.ERROR, error=message)
                    outputs.append(final_output(seq))
                outputs += self.fail_requests([seq.request_id], message)
        return outputs

    def _fail_unschedulable(self) -> list[GenerationOutput]:
        """Nothing runs yet requests wait: the head can never fit (validation should prevent it); fail it."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        head = self.scheduler.waiting[0]
        logger.error("request %s cannot be scheduled with an empty engine; failing it", head.request_id)
        message = f"the request needs more KV cache than the engine has ({self.block_manager.num_total_blocks} blocks)"
        return self.fail_requests([head.request_id], message)

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
            **self._lora_stats(),
            **(self.spec.stats.as_engine_stats() if self.spec is not None else {}),
        )

    def _lora_stats(self) -> dict[str, Any]:
        """Requests running and waiting per adapter (requests, not choices), and the slots."""
        if self.lora is None:
            return {}
        running = {s.request_id: s.adapter.info.name for s in self.scheduler.running if s.adapter is not None}
        waiting = {s.request_id: s.adapter.info.name for s in self.scheduler.waiting if s.adapter is not None}
        counts = self.lora.counts
        return {
            "lora_running": counts(running.values()),
            "lora_waiting": counts(n for r, n in waiting.items() if r not in running),
            "max_loras": self.lora.max_loras,
        }


Deliver = Callable[[list[GenerationOutput], EngineStats, list[KvEvent]], None]


class CoreLoop:
    """The core's busy loop: steps while there is work and sleeps otherwise; thread-safe `add`, `abort`, `stop`."""

    def __init__(self, core: EngineCore, deliver: Deliver) -> None:
        self.core = core
        self._deliver = deliver
        self._wakeup = threading.Condition()
        self._pending: list[GenerationRequest] = []  # admitted elsewhere, added on the loop's thread
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[EngineCore], Any], Future[Any]]] = []
        self._stopping = False
        self.last_stats = core.stats()

    def call(self, fn: Callable[[EngineCore], Any]) -> Future[Any]:
        """Run `fn(core)` on the loop's thread between two steps (after the requests added before it); its
        result or exception lands in the future."""
        future: Future[Any] = Future()
        with self._wakeup:
            if self._stopping:
                future.set_exception(EngineUnavailableError("the engine is not running"))
                return future
            self._calls.append((fn, future))
            self._wakeup.notify()
        return future

    def add(self, request: GenerationRequest, check_capacity: bool = True) -> None:
        """Queue a validated request; raises QueueFullError when the scheduler's waiting queue is full."""
        with self._wakeup:
            if check_capacity:
                self.core.scheduler.check_capacity(len(self._pending))
            self._pending.append(request)
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        with self._wakeup:
            self._aborts.append(request_id)
            self._wakeup.notify()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    def run(self) -> None:
        """Step until `stop()`; the requests still in flight then are left to the caller."""
        # The loop drops the GIL while it waits for the GPU and must get it back at once, not after another
        # thread's 5 ms default slice: measured on an H100 at 512 streams, 0.5 ms gave +17% tokens/s.
        sys.setswitchinterval(min(sys.getswitchinterval(), _GIL_SWITCH_INTERVAL_S))
        core = self.core
        while True:
            with self._wakeup:
                # Sleep while idle: no polling; add, abort and stop notify.
                while not (self._stopping or self._pending or self._aborts or self._calls or core.has_unfinished()):
                    self._wakeup.wait()
                if self._stopping:
                    break
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
            outputs: list[GenerationOutput] = []
            try:
                for request in pending:
                    try:
                        core.add_request(request)
                    except WeirError as error:  # its adapter was unloaded since the front end checked
                        outputs += core.refuse_request(request, str(error))
                for request_id in aborts:
                    core.abort_request(request_id)  # its stream is gone: the outputs go nowhere
                self._run_calls(calls)
                if core.has_unfinished():
                    outputs += core.step()
                core.collect_adapters()
            except Exception as error:  # a bug outside the model step must not kill the loop
                logger.exception("engine loop failed; failing every request in flight")
                outputs = self._fail_all(f"{type(error).__name__}: {error}")
            self.last_stats = core.stats()
            events = core.block_manager.take_events()
            if outputs or aborts or events:  # an abort frees blocks without outputs: the stats must still go out
                self._deliver(outputs, self.last_stats, events)
        self.last_stats = core.stats()
        for _, future in self._calls:
            future.set_exception(EngineUnavailableError("the engine stopped"))

    def _run_calls(self, calls: list[tuple[Callable[[EngineCore], Any], Future[Any]]]) -> None:
        for fn, future in calls:
            try:
                future.set_result(fn(self.core))
            except Exception as error:  # the caller's to handle
                future.set_exception(error)

    def _fail_all(self, message: str) -> list[GenerationOutput]:
        scheduler = self.core.scheduler
        request_ids = [s.request_id for s in [*scheduler.running, *scheduler.waiting]]
        return self.core.fail_requests(request_ids, message)
