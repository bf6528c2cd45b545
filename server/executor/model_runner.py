"""Turns a scheduled batch into tensors, owns the paged KV cache, runs the model and returns the needed logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from weir_server.config import EngineConfig
from weir_server.engine.scheduler import ScheduledSeq
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import SamplingParams
from weir_server.layers.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)


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
class ModelOutput:
    """Logits of the rows a step needs: the sampled positions, and prompt positions when prompt logprobs are asked."""

    sample_logits: torch.Tensor  # [S, vocab] float32, one row per sampled sequence in batch order
    sample_seqs: list[ScheduledSeq]
    prompt_logits: list[tuple[ScheduledSeq, torch.Tensor]]  # [L, vocab]: positions start..start+L-1


def kv_cache_shape(hf_config: Any, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """[2, num_blocks, block_size, num_kv_heads, head_dim] for one layer."""
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
    return (2, num_blocks, block_size, kv_heads, head_dim)


class ModelRunner:
    """Runs one step of the model for a batch of sequences; never decides who runs."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.model = loaded.model
        self.hf_config = loaded.hf_config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.config = config
        self.block_size = config.cache.block_size
        self.max_model_len = loaded.max_model_len
        self.num_layers = int(self.hf_config.num_hidden_layers)
        if self.device.type == "cpu" and config.executor.num_threads:
            torch.set_num_threads(config.executor.num_threads)
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB) on %s",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self._bytes_per_block() / 2**30,
            self.device,
        )

    # ---- KV cache -------------------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        shape = kv_cache_shape(self.hf_config, 1, self.block_size)
        return self.num_layers * torch.Size(shape).numel() * torch.empty((), dtype=self.dtype).element_size()

    def _allocate_kv_cache(self, num_blocks: int) -> list[torch.Tensor]:
        shape = kv_cache_shape(self.hf_config, num_blocks, self.block_size)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cuda":
            available = self._profile_available_cuda_memory()
        else:
            available = int(cache.kv_cache_memory_gb * 2**30)
        num_blocks = available // self._bytes_per_block()
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
        seq = Sequence("profile", 0, [0] * num_tokens, SamplingParams())
        seq.block_table = list(range(num_blocks))
        batch = [ScheduledSeq(seq, num_tokens)]
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

    def prepare(self, batch: list[ScheduledSeq]) -> ModelInput:
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

        prompt_rows: list[tuple[int, int, int]] = []
        indices: list[torch.Tensor] = []
        row = 0
        for i, s in enumerate(batch):
            # Logits at position p give the logprob of prompt token p + 1, so the last prompt position has none.
            if s.seq.wants_prompt_logprobs:
                count = min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens - 1) - s.start
                if count > 0:
                    first = int(query_start_loc[i])
                    indices.append(torch.arange(first, first + count))
                    prompt_rows.append((i, row, count))
                    row += count
        sample_rows = [i for i, s in enumerate(batch) if s.do_sample]
        indices.append(query_start_loc[1:][sample_rows] - 1)

        device = self.device
        attn = AttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            block_tables=block_tables.to(device=device, dtype=torch.int32),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            query_start_loc=query_start_loc.to(device=device, dtype=torch.int32),
            max_query_len=max(lens),
            max_context_len=max(context_lens),
            block_size=bs,
            query_lens_cpu=lens,
            context_lens_cpu=context_lens,
        )
        return ModelInput(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=positions.to(device),
            attn=attn,
            logits_indices=torch.cat(indices).to(device),
            prompt_rows=prompt_rows,
            sample_rows=sample_rows,
        )

    def execute(self, batch: list[ScheduledSeq]) -> ModelOutput:
        """Run the model over the batch (writing its K/V) and return the logits the step needs."""
        model_input = self.prepare(batch)
        with torch.inference_mode():
            hidden = self.forward(model_input)
            logits = self.model.compute_logits(hidden[model_input.logits_indices])
        num_prompt_rows = sum(n for _, _, n in model_input.prompt_rows)
        return ModelOutput(
            sample_logits=logits[num_prompt_rows:],
            sample_seqs=[batch[i] for i in model_input.sample_rows],
            prompt_logits=[(batch[i], logits[row : row + n]) for i, row, n in model_input.prompt_rows],
        )

    def forward(self, model_input: ModelInput) -> torch.Tensor:
        """The model call; the seam where a CUDA-graph runner replays captured decode batches."""
        return self.model(model_input.input_ids, model_input.positions, self.kv_caches, model_input.attn)
