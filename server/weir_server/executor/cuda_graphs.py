"""CUDA graphs for decode steps: captured once per batch size of a ladder, replayed with padded batches.

A decode step runs one token per sequence, so its shapes depend only on the batch size. Each size of the
ladder (1, 2, 4, 8, 16, 24, ... up to the largest) gets one graph over static input buffers; a batch is
padded to the next size, its padding rows writing their K/V to slot -1, which the kernels skip. Host inputs
are built with numpy in pinned memory and copied with non-blocking copies, so a step costs one replay.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from weir_server.executor.batch import S, ScheduledSeq
from weir_server.layers.attention_metadata import AttentionMetadata
from weir_server.progress import progress

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_batch` (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, max_batch, 8))
    return sorted({*sizes, max_batch})


def padded_size(sizes: list[int], n: int) -> int | None:
    """The smallest captured size holding `n` rows, or None when `n` exceeds them all."""
    for size in sizes:
        if size >= n:
            return size
    return None


def is_graphable_decode(batch: Sequence[ScheduledSeq[S]]) -> bool:
    """Every sequence runs exactly one token: the shape a decode graph was captured for."""
    return all(s.num_new_tokens == 1 for s in batch)


@dataclass
class DecodeInput:
    """A decode batch laid into the static buffers of the graph of size `padded`."""

    num_seqs: int
    padded: int


class DecodeGraphs:
    """Static input buffers, one captured graph per ladder size, and the host-side batch preparation."""

    def __init__(
        self,
        forward: Forward,
        device: torch.device,
        max_batch: int,
        block_size: int,
        max_model_len: int,
        lora: bool = False,
    ) -> None:
        self.forward = forward
        self.lora = lora  # fill each row's LoRA slot (i64[3]), which the captured LoRA kernels read
        self.device = device
        self.block_size = block_size
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.max_context_len = self.max_blocks * block_size  # a bound; the kernel reads the real lengths
        mb = self.max_batch
        # Device buffers the graphs read. One int64 pack (ids, positions, cache slots, LoRA slots) so one copy
        # fills it.
        self.i64 = torch.zeros((4, mb), dtype=torch.int64, device=device)
        self.i64[3].fill_(-1)
        self.context_lens = torch.ones(mb, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((mb, self.max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(mb + 1, dtype=torch.int32, device=device)
        self._table_stage = torch.zeros(mb * self.max_blocks, dtype=torch.int32, device=device)
        # Pinned host mirrors, written through numpy views, copied with non_blocking=True.
        pin = device.type == "cuda"  # (the CPU tests run the same preparation without pinned memory)
        self._host_i64 = torch.full((4, mb), -1, dtype=torch.int64, pin_memory=pin)
        self._host_ctx = torch.ones(mb, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros(mb * self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self._np_i64 = self._host_i64.numpy()
        self._np_ctx = self._host_ctx.numpy()
        self._np_tables = self._host_tables.numpy()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    # ---- capture ----------------------------------------------------------------------------------------

    def _attn(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.i64[2, :bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            max_context_len=self.max_context_len,
            block_size=self.block_size,
            query_lens_cpu=[1] * bs,
            context_lens_cpu=[1] * bs,
        )

    def run_eager(self, bs: int) -> torch.Tensor:
        """The captured computation run without a graph (warm-up, and the CPU tests of the buffers)."""
        return self.forward(self.i64[0, :bs], self.i64[1, :bs], self._attn(bs))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size, largest first so the smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        self.i64[2].fill_(-1)  # capture runs must not write any real cache slot
        pool = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in progress(self.sizes[::-1], "Capturing decode CUDA graphs", unit="graphs"):
                self.run_eager(bs)  # warm-up: compiles the Triton kernels for this shape outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._outputs[bs] = self.run_eager(bs)
                pool = graph.pool()
                self._graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch 1..%d) in %.1fs, %.0f MiB",
            len(self._graphs),
            self.max_batch,
            time.perf_counter() - started,
            used / 2**20,
        )

    # ---- one step ---------------------------------------------------------------------------------------

    def prepare(self, batch: Sequence[ScheduledSeq[S]]) -> DecodeInput | None:
        """Lay a decode batch into the static buffers (async copies); None when no graph fits it."""
        n = len(batch)
        bs = padded_size(self.sizes, n)
        if bs is None or not is_graphable_decode(batch):
            return None
        bsz = self.block_size
        seqs = [s.seq for s in batch]
        positions = [s.start for s in batch]
        tables = [seq.block_table for seq in seqs]
        widths = [len(t) for t in tables]
        width = max(widths)
        if width > self.max_blocks:
            return None
        i64 = self._np_i64
        i64[0, :n] = [seq.token_ids[p] for seq, p in zip(seqs, positions, strict=True)]
        i64[1, :n] = positions
        i64[2, :n] = [t[p // bsz] * bsz + p % bsz for t, p in zip(tables, positions, strict=True)]
        i64[:3, n:bs] = ((0,), (0,), (-1,))  # padding rows: token 0 at position 0, K/V dropped
        if self.lora:
            i64[3, :n] = [seq.lora_slot for seq in seqs]
            i64[3, n:bs] = -1
        self._np_ctx[:n] = positions
        self._np_ctx[:n] += 1
        self._np_ctx[n:bs] = 1
        # Block tables go through a [bs, width] staging area, so only the columns in use cross the bus.
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=sum(widths))
        rows = np.repeat(np.arange(n), widths)
        starts = np.repeat(np.cumsum(widths) - widths, widths)
        staged = self._np_tables[: bs * width].reshape(bs, width)
        staged[n:] = 0
        staged[rows, np.arange(flat.size) - starts] = flat

        self.i64.copy_(self._host_i64, non_blocking=True)
        self.context_lens.copy_(self._host_ctx, non_blocking=True)
        stage = self._table_stage[: bs * width]
        stage.copy_(self._host_tables[: bs * width], non_blocking=True)
        self.block_tables[:bs, :width].copy_(stage.view(bs, width))
        return DecodeInput(n, bs)

    def replay(self, decode: DecodeInput) -> torch.Tensor:
        """Run the graph; the first `num_seqs` rows of its static output [padded, hidden] are the batch's."""
        self._graphs[decode.padded].replay()
        return self._outputs[decode.padded][: decode.num_seqs]
