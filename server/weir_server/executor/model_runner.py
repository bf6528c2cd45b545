"""Turns a scheduled batch into tensors, owns the paged KV cache, runs the model and returns the needed logits."""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic

import torch

from weir_server.config import EngineConfig
from weir_server.distributed.communication import min_across_ranks
from weir_server.distributed.parallel_state import kv_heads_per_rank
from weir_server.executor.batch import PLACEHOLDER, S, ScheduledSeq, StepPublisher, StepSeq, TokenWindow
from weir_server.executor.cuda_graphs import DecodeGraphs
from weir_server.executor.kv_cache_dtype import kv_cache_torch_dtype
from weir_server.executor.kv_cache_size import available_memory_bytes, default_cpu_kv_cache_bytes
from weir_server.executor.transfer import to_device
from weir_server.kernels.cpu_ops import cpu_ops
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.layers.cpu_linear import pack_linear_layers
from weir_server.layers.lora import LoRALinear, LoRAState, lora_spec, uses_kernel, wrap_lora_layers

if TYPE_CHECKING:
    from weir_server.executor.lora_checkpoint import LoRAWeights
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)


# CPU: steps of at most this many tokens run on one thread fewer than all. In process two threads pay from one token
# up (packaged SmolLM2, this 2-core Zen 4: 1 sequence 7.6 -> 6.1 ms a step, 8 sequences 32 -> 21), but over gRPC the
# event loop wakes at every step and preempts one of them, and the other waits at the next barrier: one thread is
# faster up to 4 tokens (1 stream 77-100 against 65-73 tok/s; 4 streams 151 against 131; an n-gram verify of 4
# tokens, ITL 5.1-5.4 against 6.7 ms), two from 8 (8 streams 226-237 against 191).
SMALL_STEP_TOKENS = 4
# The threads that step the model run this much below normal priority (nice), and so do the OpenMP workers they
# start (Linux threads inherit it): the server's event loop, the gateway and health checks sharing the cores then
# preempt a step at once instead of queueing behind a team that holds every core.
CPU_STEP_NICENESS = 5


_lowered = threading.local()  # set on a thread once it was lowered: several runners (a draft's) share one thread


def _lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness`, once per thread (on Linux a thread's own; elsewhere a
    no-op)."""
    if getattr(_lowered, "done", False) or not hasattr(os, "setpriority"):
        return
    _lowered.done = True
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError as error:  # a sandbox that forbids it: the step still runs, at normal priority
        logger.debug("could not lower the stepping thread's priority: %s", error)


@dataclass
class ModelInput:
    """One step's flattened batch on the model's device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N] token rows whose logits are computed
    prompt_rows: list[tuple[int, int, int]]  # (batch index, first logits row, number of rows) per prompt-logprobs seq
    sample_rows: list[int]  # batch index of each sampled sequence; their rows follow the prompt rows


@dataclass
class TokenFeed:
    """Tokens sampled by the previous step, still on the device: the inputs of sequences whose last token is a
    PLACEHOLDER come from here (`rows`: seq_id -> row of `tokens`)."""

    tokens: torch.Tensor  # [S] int64
    rows: dict[int, int]


@dataclass
class ModelOutput(Generic[S]):
    """Logits of the rows a step needs: the sampled positions, and prompt positions when prompt logprobs are asked."""

    sample_logits: torch.Tensor  # [S, vocab] float32: `num_logits` rows (usually 1) per sampled sequence in batch order
    sample_seqs: list[ScheduledSeq[S]]
    prompt_logits: list[tuple[ScheduledSeq[S], torch.Tensor]]  # [L, vocab]: positions start..start+L-1


def kv_cache_shape(hf_config: Any, num_blocks: int, block_size: int, tp_size: int = 1) -> tuple[int, ...]:
    """[2, num_blocks, block_size, num_kv_heads, head_dim] for one layer; under tensor parallelism (`tp_size`
    ranks) the KV heads are this rank's."""
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    kv_heads = kv_heads_per_rank(kv_heads, tp_size)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
    return (2, num_blocks, block_size, kv_heads, head_dim)


class ModelRunner:
    """Runs one step of the model for a batch of sequences; never decides who runs."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        publisher: StepPublisher | None = None,
        shared_block_bytes: int = 0,
        graph_query_lens: tuple[int, ...] | None = None,
    ) -> None:
        """`shared_block_bytes`: KV bytes another model keeps per block of this cache (a speculative draft model
        addressed through the same block tables), counted when the number of blocks is decided. `graph_query_lens`:
        the rows per sequence CUDA graphs are captured for; by default 1, and 1 + K for speculative verify steps."""
        self.model = loaded.model
        self.hf_config = loaded.hf_config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.kv_dtype = kv_cache_torch_dtype(config.cache.cache_dtype, loaded.dtype)  # --kv-cache-dtype
        self.config = config
        # Rank 0 of a tensor-parallel group sends each batch to the workers, which run the same `execute`.
        self.publisher = publisher
        self.tp_size = config.parallel.tensor_parallel_size
        self.block_size = config.cache.block_size
        self.max_model_len = loaded.max_model_len
        self.num_layers = int(self.hf_config.num_hidden_layers)
        self.shared_block_bytes = shared_block_bytes
        spec = config.speculative
        self.graph_query_lens = graph_query_lens or ((1,) if spec is None else (1, 1 + spec.num_speculative_tokens))
        # LoRA layers wrap the loaded weights before CPU packing and graph capture see them.
        self.lora_state: LoRAState | None = None
        self.lora_layers: dict[str, LoRALinear] = {}
        if config.lora is not None:
            self.lora_state, self.lora_layers = wrap_lora_layers(
                self.model, config.lora.max_loras, config.lora.max_lora_rank
            )
        self.lora_spec = lora_spec(self.lora_layers)
        if self.device.type == "cpu":
            self._prepare_cpu()
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB) on %s",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self._bytes_per_block() / 2**30,
            self.device,
        )
        self.graphs = self._capture_graphs()

    def _prepare_cpu(self) -> None:
        """Intra-op threads = physical cores (SMT siblings only contend for the same FMA units), one fewer for small
        steps unless the config fixes num_threads, and bf16 weights packed once for oneDNN."""
        fixed = self.config.executor.num_threads
        threads = fixed or physical_cores()
        # A step of a few tokens gains little from more threads (it mostly reads weights), while the event loop
        # waking on its outputs would preempt one of them and stall the whole team at the next barrier.
        self._cpu_threads = (threads if fixed else max(1, threads - 1), threads)
        self._threads_now = threads
        torch.set_num_threads(threads)
        packed = pack_linear_layers(self.model) if self.dtype == torch.bfloat16 else 0
        prepare_cpu_decode = getattr(self.model, "prepare_cpu_decode", None)
        # A GGUF kept quantized has no bf16 layer to pack, and may still run in one call.
        one_call = prepare_cpu_decode is not None and self.dtype == torch.bfloat16 and prepare_cpu_decode()
        logger.info(
            "CPU: %d torch threads (%d for steps of <= %d tokens), %d linear layers packed for oneDNN, %s%s",
            threads,
            self._cpu_threads[0],
            SMALL_STEP_TOKENS,
            packed,
            "C++ decode ops" if cpu_ops() is not None else "torch paths only",  # built here, at start, if need be
            ", decode layers in one C++ call" if one_call else "",
        )

    def _set_cpu_threads(self, num_tokens: int) -> None:
        _lower_thread_priority(CPU_STEP_NICENESS)  # before the thread's first OpenMP team, which inherits it
        threads = self._cpu_threads[num_tokens > SMALL_STEP_TOKENS]
        if threads != self._threads_now:
            torch.set_num_threads(threads)
            self._threads_now = threads

    def _capture_graphs(self) -> DecodeGraphs | None:
        """Decode graphs on CUDA unless --enforce-eager (or Triton, which the graphed kernels need, is missing)."""
        from weir_server.kernels import HAS_TRITON

        if self.device.type != "cuda" or self.config.executor.enforce_eager:
            return None
        if not HAS_TRITON:
            logger.warning("Triton is missing: decode runs eagerly without CUDA graphs")
            return None
        max_batch = min(self.config.executor.cuda_graph_max_batch, self.config.scheduler.max_num_seqs)
        lora = self.lora_state is not None and uses_kernel(self.device)
        if self.lora_state is not None and not lora:
            logger.warning("LoRA needs Triton under CUDA graphs: decode runs eagerly")
            return None
        spec = self.config.speculative  # verify steps come only from batches below the back-off size
        graphs = DecodeGraphs(
            self._graph_forward,
            self.device,
            max_batch,
            self.block_size,
            self.max_model_len,
            lora=lora,
            query_lens=self.graph_query_lens,
            multi_max_batch=spec.disable_by_batch_size if spec is not None else None,
        )
        self._graphs_under_capture = graphs
        graphs.capture()
        return graphs

    def _graph_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        if self.lora_state is not None:  # the captured LoRA kernels read each row's slot from the static buffer
            self.lora_state.set_graph_slots(self._graphs_under_capture.i64[3, : input_ids.shape[0]])
        return self.model(input_ids, positions, self.kv_caches, attn)

    # ---- LoRA -----------------------------------------------------------------------------------------

    def load_lora(self, slot: int, weights: LoRAWeights | None) -> None:
        """Fill (or empty, with None) a LoRA slot of every LoRA layer, on every tensor-parallel rank; the steps
        after it see the new weights (graphs too: they read the slot buffers in place)."""
        if self.publisher is not None:
            self.publisher.publish_lora(slot, weights)
        layers = weights.layers if weights is not None else {}
        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                layer.set_slot(slot, layers.get(name))

    # ---- KV cache -------------------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        shape = kv_cache_shape(self.hf_config, 1, self.block_size, self.tp_size)
        return self.num_layers * torch.Size(shape).numel() * torch.empty((), dtype=self.kv_dtype).element_size()

    def _allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        shape = kv_cache_shape(self.hf_config, num_blocks, self.block_size, self.tp_size)
        if self.device.type == "cpu":
            return [_lazily_zeroed(shape, self.kv_dtype) for _ in range(self.num_layers)]
        return [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.num_layers)]

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cuda":
            available = self._profile_available_cuda_memory()
        elif cache.kv_cache_memory_gb is not None:
            available = int(cache.kv_cache_memory_gb * 2**30)
        else:
            # A draft model's cache shares the block count, so its bytes count per token too.
            bytes_per_token = (self._bytes_per_block() + self.shared_block_bytes) // self.block_size
            max_seqs = self.config.scheduler.max_num_seqs
            available = default_cpu_kv_cache_bytes(
                bytes_per_token, max_seqs, self.max_model_len, available_memory_bytes()
            )
        # Every tensor-parallel rank must hold the same blocks, so all take the smallest that fits.
        num_blocks = min_across_ranks(available // (self._bytes_per_block() + self.shared_block_bytes))
        if num_blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache ({available / 2**30:.2f} GiB available); "
                "raise kv_cache_memory_gb / gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return num_blocks

    def _profile_available_cuda_memory(self) -> int:
        """Bytes the KV cache may take: the budget minus weights, other users, and the peak of a full step."""
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        caches = self._allocate_kv_cache(num_blocks)
        seq = StepSeq(-1, TokenWindow(0, [0] * num_tokens), list(range(num_blocks)), num_tokens)
        batch = [ScheduledSeq(seq, num_tokens, 0)]
        model_input = self.prepare(batch)
        rows = model_input.input_ids.new_zeros(min(num_tokens, self.config.scheduler.max_num_seqs))
        with torch.inference_mode():
            hidden = self.model(model_input.input_ids, model_input.positions, caches, model_input.attn)
            self.model.compute_logits(hidden[rows])
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        del caches, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = int(total * (1.0 - self.config.cache.gpu_memory_utilization))
        return int(free - reserved - activation_peak)

    # ---- one step -------------------------------------------------------------------------------------

    def prepare(self, batch: Sequence[ScheduledSeq[S]]) -> ModelInput:
        """Flatten the batch: token ids, positions, cache slots, block tables and the logits rows to compute."""
        bs = self.block_size
        starts = [s.start for s in batch]
        lens = [s.num_new_tokens for s in batch]
        token_ids: list[int] = []
        for s, start, n in zip(batch, starts, lens, strict=True):
            token_ids.extend(s.seq.token_ids[start : start + n])
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = [s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in batch]

        lens_t = torch.tensor(lens, dtype=torch.long)
        starts_t = torch.tensor(starts, dtype=torch.long)
        query_start_loc = torch.zeros(len(batch) + 1, dtype=torch.long)
        torch.cumsum(lens_t, 0, out=query_start_loc[1:])
        seq_of_token = torch.repeat_interleave(torch.arange(len(batch)), lens_t)
        positions = torch.arange(len(token_ids)) - query_start_loc[seq_of_token] + starts_t[seq_of_token]
        block_tables = torch.tensor(tables, dtype=torch.long)
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        context_lens = [start + n for start, n in zip(starts, lens, strict=True)]

        token_rows, sample_rows = _logit_rows(batch, query_start_loc[:-1].tolist())
        indices = [torch.arange(first, first + n) for _, first, n in token_rows]
        indices.append(_sample_logit_rows(batch, sample_rows, query_start_loc[1:]))
        prompt_rows = _number_prompt_rows(token_rows)

        device = self.device
        attn = AttentionMetadata(
            slot_mapping=to_device(slot_mapping, device),
            block_tables=to_device(block_tables, device, torch.int32),
            context_lens=to_device(context_lens, device, torch.int32),
            query_start_loc=to_device(query_start_loc, device, torch.int32),
            max_query_len=max(lens),
            max_context_len=max(context_lens),
            block_size=bs,
            query_lens_cpu=lens,
            context_lens_cpu=context_lens,
        )
        return ModelInput(
            input_ids=to_device(token_ids, device, torch.long),
            positions=to_device(positions, device),
            attn=attn,
            logits_indices=to_device(torch.cat(indices), device),
            prompt_rows=prompt_rows,
            sample_rows=sample_rows,
        )

    def execute(self, batch: list[ScheduledSeq[S]], feed: TokenFeed | None = None) -> ModelOutput[S]:
        """Run the model over the batch (writing its K/V) and return the logits the step needs. Placeholder
        input tokens are taken from `feed` on the device, without waiting for them."""
        if self.publisher is not None:
            self.publisher.publish(batch)
        if self.device.type == "cpu":
            self._set_cpu_threads(sum(s.num_new_tokens for s in batch))
        decode = self.graphs.prepare(batch) if self.graphs is not None else None
        if self.lora_state is not None and decode is None:  # a graph reads its rows' slots from its own buffer
            self.lora_state.set_tokens([s.seq.lora_slot for s in batch], [s.num_new_tokens for s in batch], self.device)
        if decode is not None:
            q = decode.query_len
            firsts = range(len(batch)) if q == 1 else decode.first_rows(batch)
            _feed_placeholders(self.graphs.i64[0], batch, firsts, feed)  # type: ignore[union-attr]
            prompt_rows, sample_rows = _logit_rows(batch, firsts)
            with torch.inference_mode():
                hidden = self.graphs.replay(decode)  # type: ignore[union-attr]
                if q == 1 and not prompt_rows and len(sample_rows) == len(batch):
                    logits = self.model.compute_logits(hidden)
                else:
                    rows = [r for _, first, n in prompt_rows for r in range(first, first + n)]
                    # Each sampled sequence's last num_logits rows (one, or 1 + its proposed tokens).
                    rows += [r for i in sample_rows for r in range((i + 1) * q - batch[i].num_logits, (i + 1) * q)]
                    logits = self.model.compute_logits(hidden[to_device(rows, self.device, torch.long)])
            prompt_rows = _number_prompt_rows(prompt_rows)
        else:
            model_input = self.prepare(batch)
            first_rows = itertools.accumulate((s.num_new_tokens for s in batch[:-1]), initial=0)
            _feed_placeholders(model_input.input_ids, batch, list(first_rows), feed)
            prompt_rows, sample_rows = model_input.prompt_rows, model_input.sample_rows
            with torch.inference_mode():
                hidden = self.forward(model_input)
                logits = self.model.compute_logits(hidden[model_input.logits_indices])
        num_prompt_rows = sum(n for _, _, n in prompt_rows)
        return ModelOutput(
            sample_logits=logits[num_prompt_rows:],
            sample_seqs=[batch[i] for i in sample_rows],
            prompt_logits=[(batch[i], logits[row : row + n]) for i, row, n in prompt_rows],
        )

    def forward(self, model_input: ModelInput) -> torch.Tensor:
        """The model call; the seam where a CUDA-graph runner replays captured decode batches."""
        return self.model(model_input.input_ids, model_input.positions, self.kv_caches, model_input.attn)


def _feed_placeholders(
    input_ids: torch.Tensor, batch: Sequence[ScheduledSeq[S]], first_rows: Sequence[int], feed: TokenFeed | None
) -> None:
    """Write the previous step's sampled tokens (on the device) into the input rows that hold placeholders."""
    dst: list[int] = []
    src: list[int] = []
    for s, first in zip(batch, first_rows, strict=True):
        token_ids = s.seq.token_ids
        last = len(token_ids) - 1
        if token_ids[last] == PLACEHOLDER and s.start <= last:  # only a sequence's last token can be one
            assert feed is not None, "a placeholder input without the step that samples it"
            dst.append(first + last - s.start)
            src.append(feed.rows[s.seq.seq_id])
    if dst:
        device = input_ids.device
        rows = to_device(src, device, torch.long)
        input_ids.index_copy_(0, to_device(dst, device, torch.long), feed.tokens.index_select(0, rows))  # type: ignore[union-attr]


def _lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in an anonymous memory map: the OS hands out zero pages as blocks are first written, so the process's
    RSS grows with the KV blocks in use instead of the whole pool at start-up (torch.zeros touches every page)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the map alive


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthread siblings count once)."""
    cpus = os.sched_getaffinity(0)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs topology (containers, non-Linux): count logical CPUs
            return len(cpus)
    return max(1, len(cores))


def _logit_rows(
    batch: Sequence[ScheduledSeq[S]], first_rows: Sequence[int]
) -> tuple[list[tuple[int, int, int]], list[int]]:
    """(batch index, first token row, count) of each prompt-logprobs slice, and the batch indices sampled.

    Logits at position p give the logprob of prompt token p + 1, so the last prompt position has none.
    """
    prompt_rows: list[tuple[int, int, int]] = []
    for i, s in enumerate(batch):
        if s.seq.wants_prompt_logprobs:
            count = min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens - 1) - s.start
            if count > 0:
                prompt_rows.append((i, int(first_rows[i]), count))
    return prompt_rows, [i for i, s in enumerate(batch) if s.do_sample]


def _sample_logit_rows(
    batch: Sequence[ScheduledSeq[S]], sample_rows: list[int], query_ends: torch.Tensor
) -> torch.Tensor:
    """Token rows of the sampled logits: each sampled sequence's last `num_logits` rows (speculative verification
    needs one per proposed token, plus the next)."""
    ends = query_ends[sample_rows]
    widths = [batch[i].num_logits for i in sample_rows]
    if all(w == 1 for w in widths):
        return ends - 1
    counts = torch.tensor(widths, dtype=torch.long)
    first = torch.repeat_interleave(ends - counts, counts)
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return first + offsets


def _number_prompt_rows(token_rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Token rows -> rows of the computed logits, where the prompt slices come first, back to back."""
    numbered: list[tuple[int, int, int]] = []
    row = 0
    for i, _, n in token_rows:
        numbered.append((i, row, n))
        row += n
    return numbered
