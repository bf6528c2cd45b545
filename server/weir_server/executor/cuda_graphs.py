"""CUDA graphs for decode steps: captured once per batch size of a ladder, replayed with padded batches.

A decode step runs one token per sequence, so its shapes depend only on the batch size. Each size of the
ladder (1, 2, 4, 8, 16, 24, ... up to the largest) gets one graph over static input buffers; a batch is
padded to the next size, its padding rows writing their K/V to slot -1, which the kernels skip. Host inputs
are built with numpy in pinned memory and copied with non-blocking copies, so a step costs one replay.

Speculative decoding adds a second query length, 1 + K: a verify step runs each sequence's last token and its
proposed ones. Its graphs give every sequence q rows; a sequence with fewer new tokens n (fewer or no proposals)
is padded at the front with q - n rows at the positions before its first new token, already in the cache: they
attend like any row but write no K/V (slot -1), and their outputs are dropped, so the real rows compute exactly
what they would alone. Attention runs the chunked-prefill kernel there, whose grid depends only on q and the batch.
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


HOST_STAGES = 2  # host mirrors taking turns: the host prepares a batch while the last one's copy may still wait


class _HostStage:
    """One set of the pinned host mirrors of the graphs' input buffers (written through their numpy views), and
    when its last copy ran."""

    def __init__(self, rows: int, max_batch: int, max_blocks: int, pin: bool) -> None:
        # (the CPU tests run the same preparation without pinned memory)
        self.i64 = torch.full((4, rows), -1, dtype=torch.int64, pin_memory=pin)
        self.ctx = torch.ones(max_batch, dtype=torch.int32, pin_memory=pin)
        self.tables = torch.zeros(max_batch * max_blocks, dtype=torch.int32, pin_memory=pin)
        self.np_i64, self.np_ctx, self.np_tables = self.i64.numpy(), self.ctx.numpy(), self.tables.numpy()
        self.copied: torch.cuda.Event | None = None


def graph_query_len(batch: Sequence[ScheduledSeq[S]], query_lens: Sequence[int]) -> int | None:
    """The captured query length (sorted `query_lens`) a batch replays with: 1 for plain decodes, else the smallest
    q holding every sequence's new tokens with q - n front rows at positions >= 0; None when none does."""
    longest = max(s.num_new_tokens for s in batch)
    if longest == 1:
        return 1 if query_lens[0] == 1 else None
    for q in query_lens:
        if q >= longest:
            return q if all(s.start + s.num_new_tokens >= q for s in batch) else None
    return None


@dataclass
class DecodeInput:
    """A decode batch laid into the static buffers of the graph of size `padded` and `query_len` rows a sequence."""

    num_seqs: int
    padded: int
    query_len: int = 1

    def first_rows(self, batch: Sequence[ScheduledSeq[S]]) -> list[int]:
        """The graph's row of each sequence's first new token (its front padding comes before it)."""
        q = self.query_len
        return [(i + 1) * q - s.num_new_tokens for i, s in enumerate(batch)]


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
        query_lens: Sequence[int] = (1,),
        multi_max_batch: int | None = None,
    ) -> None:
        """`query_lens`: the rows per sequence graphs are captured for: 1 (decode), and 1 + K for verify steps;
        `multi_max_batch`: the largest batch captured with more than one row a sequence (speculation backs off above
        it), by default `max_batch`."""
        self.forward = forward
        self.query_lens = sorted(set(query_lens))
        self.lora = lora  # fill each row's LoRA slot (i64[3]), which the captured LoRA kernels read
        self.device = device
        self.block_size = block_size
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        self.multi_sizes = batch_size_ladder(min(max_batch, multi_max_batch or max_batch))
        self.max_blocks = -(-max_model_len // block_size)
        self.max_context_len = self.max_blocks * block_size  # a bound; the kernel reads the real lengths
        mb = self.max_batch
        rows = mb * self.query_lens[-1]
        # Device buffers the graphs read. One int64 pack (ids, positions, cache slots, LoRA slots) so one copy
        # fills it.
        self.i64 = torch.zeros((4, rows), dtype=torch.int64, device=device)
        self.i64[3].fill_(-1)
        self.context_lens = torch.ones(mb, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((mb, self.max_blocks), dtype=torch.int32, device=device)
        self.query_start_locs = {
            q: torch.arange(0, (mb + 1) * q, q, dtype=torch.int32, device=device) for q in self.query_lens
        }
        self._table_stage = torch.zeros(mb * self.max_blocks, dtype=torch.int32, device=device)
        # Pinned host mirrors, written through numpy views, copied with non_blocking=True. A copy reads its mirror
        # when the stream reaches it, which may be after the host has prepared the next batch (a draft model's steps
        # are launched back to back), so the mirrors take turns, each written again only once its last copy is done.
        self._stages = [_HostStage(rows, mb, self.max_blocks, pin=device.type == "cuda") for _ in range(HOST_STAGES)]
        self._host = self._stages[0]  # the mirror the batch being prepared is written into
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (query_len, batch size) -> graph
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}

    # ---- capture ----------------------------------------------------------------------------------------

    def _attn(self, bs: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.i64[2, : bs * q],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            query_start_loc=self.query_start_locs[q][: bs + 1],
            max_query_len=q,
            max_context_len=self.max_context_len,
            block_size=self.block_size,
            query_lens_cpu=[q] * bs,
            # Only the torch path reads these (the CPU tests); the kernels read the device lengths.
            context_lens_cpu=self._host.np_ctx[:bs].tolist(),
        )

    def run_eager(self, bs: int, q: int = 1) -> torch.Tensor:
        """The captured computation run without a graph (warm-up, and the CPU tests of the buffers)."""
        return self.forward(self.i64[0, : bs * q], self.i64[1, : bs * q], self._attn(bs, q))

    def replay_eager(self, decode: DecodeInput) -> torch.Tensor:
        """What `replay` returns, computed without a graph (the CPU tests)."""
        return self.run_eager(decode.padded, decode.query_len)[: decode.num_seqs * decode.query_len]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size, largest first so the smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        self.i64[2].fill_(-1)  # capture runs must not write any real cache slot
        pool = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        self._host.np_ctx[:] = self.query_lens[-1]  # padding sequences' rows sit at positions 0..q-1
        self.context_lens.fill_(self.query_lens[-1])
        shapes = [(q, bs) for q in self.query_lens[::-1] for bs in (self.multi_sizes if q > 1 else self.sizes)[::-1]]
        with torch.cuda.stream(stream):
            for q, bs in progress(shapes, "Capturing decode CUDA graphs", unit="graphs"):
                self.run_eager(bs, q)  # warm-up: compiles the Triton kernels for this shape outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._outputs[q, bs] = self.run_eager(bs, q)
                pool = graph.pool()
                self._graphs[q, bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch 1..%d, query lengths %s) in %.1fs, %.0f MiB",
            len(self._graphs),
            self.max_batch,
            "/".join(map(str, self.query_lens)),
            time.perf_counter() - started,
            used / 2**20,
        )

    # ---- one step ---------------------------------------------------------------------------------------

    def _next_stage(self) -> None:
        """Write the next batch into the next host mirror, once the copy that last read it has run."""
        stage = self._stages[(self._stages.index(self._host) + 1) % len(self._stages)]
        if stage.copied is not None:
            stage.copied.synchronize()
        self._host = stage

    def prepare(self, batch: Sequence[ScheduledSeq[S]]) -> DecodeInput | None:
        """Lay a decode batch into the static buffers (async copies); None when no graph fits it."""
        self._next_stage()
        n = len(batch)
        if not is_graphable_decode(batch):
            q = graph_query_len(batch, self.query_lens)
            bs = padded_size(self.multi_sizes, n)
            return None if q is None or bs is None else self._prepare_verify(batch, bs, q)
        bs = padded_size(self.sizes, n)
        if bs is None:
            return None
        bsz = self.block_size
        seqs = [s.seq for s in batch]
        positions = [s.start for s in batch]
        tables = [seq.block_table for seq in seqs]
        widths = [len(t) for t in tables]
        width = max(widths)
        if width > self.max_blocks:
            return None
        i64 = self._host.np_i64
        i64[0, :n] = [seq.token_ids[p] for seq, p in zip(seqs, positions, strict=True)]
        i64[1, :n] = positions
        i64[2, :n] = [t[p // bsz] * bsz + p % bsz for t, p in zip(tables, positions, strict=True)]
        i64[:3, n:bs] = ((0,), (0,), (-1,))  # padding rows: token 0 at position 0, K/V dropped
        if self.lora:
            i64[3, :n] = [seq.lora_slot for seq in seqs]
            i64[3, n:bs] = -1
        ctx = self._host.np_ctx
        ctx[:n] = positions
        ctx[:n] += 1
        ctx[n:bs] = 1
        self._stage_tables(tables, bs)
        self._copy_in(bs, width)
        return DecodeInput(n, bs)

    def _prepare_verify(self, batch: Sequence[ScheduledSeq[S]], bs: int, q: int) -> DecodeInput | None:
        """Lay a batch of up to q new tokens a sequence into q rows each, front-padded (see the module's doc)."""
        n = len(batch)
        bsz = self.block_size
        tables = [s.seq.block_table for s in batch]
        width = max(len(t) for t in tables)
        if width > self.max_blocks:
            return None
        staged = self._stage_tables(tables, bs)
        lens = np.fromiter((s.num_new_tokens for s in batch), dtype=np.int64, count=n)
        ends = np.fromiter((s.start + s.num_new_tokens for s in batch), dtype=np.int64, count=n)
        offsets = np.arange(q)
        positions = ends[:, None] - q + offsets  # [n, q]; front padding at the positions before the new tokens
        real = offsets >= (q - lens)[:, None]
        tokens = np.zeros((n, q), dtype=np.int64)
        tokens[real] = list(
            itertools.chain.from_iterable(s.seq.token_ids[s.start : s.start + s.num_new_tokens] for s in batch)
        )
        slots = staged[np.arange(n)[:, None], positions // bsz].astype(np.int64) * bsz + positions % bsz
        slots[~real] = -1  # the padding rows' K/V is already in the cache: never rewritten
        i64 = self._host.np_i64
        rows = n * q
        i64[0, :rows] = tokens.ravel()
        i64[1, :rows] = positions.ravel()
        i64[2, :rows] = slots.ravel()
        i64[:3, rows : bs * q] = ((0,), (0,), (-1,))
        i64[1, rows : bs * q] = np.tile(offsets, bs - n)  # padding sequences: positions 0..q-1
        if self.lora:
            i64[3, :rows] = np.where(real, np.array([s.seq.lora_slot for s in batch])[:, None], -1).ravel()
            i64[3, rows : bs * q] = -1
        self._host.np_ctx[:n] = ends
        self._host.np_ctx[n:bs] = q
        self._copy_in(bs, width)
        return DecodeInput(n, bs, q)

    def _stage_tables(self, tables: list[list[int]], bs: int) -> np.ndarray:
        """Block tables into the host's [bs, width] staging area, so only the columns in use cross the bus."""
        widths = [len(t) for t in tables]
        n, width = len(tables), max(widths)
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=sum(widths))
        rows = np.repeat(np.arange(n), widths)
        starts = np.repeat(np.cumsum(widths) - widths, widths)
        staged = self._host.np_tables[: bs * width].reshape(bs, width)
        staged[n:] = 0
        staged[rows, np.arange(flat.size) - starts] = flat
        return staged

    def _copy_in(self, bs: int, width: int) -> None:
        host = self._host
        self.i64.copy_(host.i64, non_blocking=True)
        self.context_lens.copy_(host.ctx, non_blocking=True)
        stage = self._table_stage[: bs * width]
        stage.copy_(host.tables[: bs * width], non_blocking=True)
        self.block_tables[:bs, :width].copy_(stage.view(bs, width))
        if self.device.type == "cuda":
            host.copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            host.copied.record()

    def replay(self, decode: DecodeInput) -> torch.Tensor:
        """Run the graph; the first `num_seqs * query_len` rows of its static output [padded * query_len, hidden]
        are the batch's."""
        key = (decode.query_len, decode.padded)
        self._graphs[key].replay()
        return self._outputs[key][: decode.num_seqs * decode.query_len]
