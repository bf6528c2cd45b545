"""Tensor-parallel execution on one host: rank 0 starts a worker process per other rank and feeds it each batch.

Rank 0 is the engine's own process: it runs the one scheduler, its shard of the model and the sampler. Every
other rank is a worker (`weir_server.distributed.worker`) holding its shard and KV heads; before each step
rank 0 sends the scheduled batch down a pipe and every rank runs the same `ModelRunner.execute`, meeting in
the all-reduces. Rank 0 watches the workers: one that dies fails the engine with a clear error, then the
process exits, because a forward pass waiting on a dead peer can never finish.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from weir_server.config import EngineConfig
from weir_server.distributed import parallel_state
from weir_server.errors import EngineUnavailableError
from weir_server.executor.batch import ScheduledSeq, StepSeq, TokenWindow

logger = logging.getLogger(__name__)

# NVLink multicast (NVLS) can take a shared host's GPUs out of service; keep it off in every process we start.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STOP_MESSAGE = b""  # the message that ends a worker's loop
_EXIT_GRACE_S = 2.0  # lets the engine fail the requests of a step that can still fail before the process exits


class WorkerDiedError(EngineUnavailableError):
    """A tensor-parallel worker process is gone; the engine cannot run another step."""


# ---- a batch on the wire --------------------------------------------------------------------------------


def encode_batch(batch: list[ScheduledSeq[Any]]) -> bytes:
    """The fields of a scheduled batch that running the model needs: this step's tokens, not the history."""
    rows = [
        (
            s.start,
            s.num_new_tokens,
            s.do_sample,
            s.num_logits,  # verify rows of speculative decoding: every rank gathers the same logits rows
            s.seq.seq_id,
            s.seq.token_ids[s.start : s.start + s.num_new_tokens],
            s.seq.block_table,
            s.seq.num_prompt_tokens,
            s.seq.wants_prompt_logprobs,
            s.seq.lora_slot,
        )
        for s in batch
    ]
    return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)


def decode_batch(data: bytes) -> list[ScheduledSeq[StepSeq]]:
    """The batch `encode_batch` sent, over stand-in sequences."""
    return _decode_rows(pickle.loads(data))  # noqa: S301 - rank 0 of our own group, private pipe


def _decode_rows(rows: list[tuple[Any, ...]]) -> list[ScheduledSeq[StepSeq]]:
    batch = []
    for start, n, do_sample, num_logits, seq_id, tokens, table, num_prompt, wants_prompt, lora_slot in rows:
        seq = StepSeq(seq_id, TokenWindow(start, tokens), table, num_prompt, wants_prompt, lora_slot)
        scheduled = ScheduledSeq(seq, n, start)
        scheduled.do_sample = do_sample
        scheduled.num_logits = num_logits
        batch.append(scheduled)
    return batch


def encode_lora(slot: int, weights: Any) -> bytes:
    """A LoRA slot's new weights (`LoRAWeights`, None = empty), for the workers to load before the next step."""
    return pickle.dumps(("lora", slot, weights), protocol=pickle.HIGHEST_PROTOCOL)


def run_message(runner: Any, data: bytes) -> None:
    """A worker's handling of one message from rank 0: a step's batch, or a LoRA slot to fill."""
    message = pickle.loads(data)  # noqa: S301 - rank 0 of our own group, private pipe
    if isinstance(message, tuple) and message and message[0] == "lora":
        runner.load_lora(message[1], message[2])
    else:
        runner.execute(_decode_rows(message))


# ---- rank 0 ------------------------------------------------------------------------------------------


def rank_devices(config: EngineConfig) -> list[torch.device]:
    """The device of each rank: consecutive GPUs from the configured one, or the CPU for every rank (gloo)."""
    size = config.parallel.tensor_parallel_size
    name = config.model.device
    if name == "cpu":
        return [torch.device("cpu")] * size
    if name == "auto" and not torch.cuda.is_available():
        return [torch.device("cpu")] * size
    base = torch.device("cuda" if name == "auto" else name)
    if base.type != "cuda":
        raise ValueError(f"tensor parallelism runs on cpu or cuda devices, not {name!r}")
    first = base.index or 0
    count = torch.cuda.device_count()
    if first + size > count:
        raise ValueError(f"--tensor-parallel-size {size} from cuda:{first} needs {first + size} GPUs; {count} visible")
    return [torch.device("cuda", first + rank) for rank in range(size)]


def _exit_process(message: str) -> None:
    """The default reaction to a dead worker in a server: log, give the engine a moment, exit non-zero."""
    logger.critical("%s; the model cannot run without it, so this process exits", message)
    time.sleep(_EXIT_GRACE_S)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


class TensorParallelExecutor:
    """Rank 0's end of a tensor-parallel group: the worker processes, the step pipes and the watch on them."""

    def __init__(self, config: EngineConfig, on_worker_death: Callable[[str], None] = _exit_process) -> None:
        self.config = config
        self.world_size = config.parallel.tensor_parallel_size
        self.devices = rank_devices(config)
        self._on_worker_death = on_worker_death
        self._procs: list[BaseProcess] = []
        self._pipes: list[Connection] = []
        self._failure: str | None = None
        self._stopping = False
        self._wake_reader, self._wake_writer = mp.Pipe(duplex=False)
        self._watcher: threading.Thread | None = None

    @property
    def failure(self) -> str | None:
        """Why the group is broken, or None while every worker runs."""
        return self._failure

    def start(self) -> None:
        """Start the workers and join the group as rank 0."""
        from weir_server.distributed.worker import run_worker  # the spawned processes import it by name

        os.environ.update(NO_MULTICAST_ENV)  # inherited by the workers
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: CUDA cannot be forked
        level = logging.getLogger().getEffectiveLevel()
        for rank in range(1, self.world_size):
            reader, writer = ctx.Pipe(duplex=False)
            model = replace(self.config.model, device=str(self.devices[rank]))
            proc = ctx.Process(
                target=run_worker,
                args=(rank, self.world_size, init_method, replace(self.config, model=model), reader, level),
                name=f"weir-tp-worker-{rank}",
                daemon=True,
            )
            proc.start()
            reader.close()  # the worker's end
            self._procs.append(proc)
            self._pipes.append(writer)
        self._watcher = threading.Thread(target=self._watch, name="weir-tp-watch", daemon=True)
        self._watcher.start()
        atexit.register(self.shutdown)
        logger.info("started %d tensor-parallel workers; joining the group", self.world_size - 1)
        timeout = self.config.parallel.collective_timeout_s
        parallel_state.initialize(0, self.world_size, init_method, self.devices[0], timeout)

    def publish(self, batch: list[ScheduledSeq[Any]]) -> None:
        """Send the step's batch to every worker; raises WorkerDiedError once any worker is gone."""
        self._send(encode_batch(batch))

    def publish_lora(self, slot: int, weights: Any) -> None:
        """Send every worker a LoRA slot's weights; they load them before the next step, in order."""
        self._send(encode_lora(slot, weights))

    def _send(self, data: bytes) -> None:
        self._check_workers()
        for rank, pipe in enumerate(self._pipes, start=1):
            try:
                pipe.send_bytes(data)
            except OSError as error:
                self._check_workers()
                raise WorkerDiedError(f"tensor-parallel worker rank {rank} stopped reading steps: {error}") from error

    def shutdown(self) -> None:
        """Stop the workers (politely, then by signal), leave the group; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._wake_writer.send_bytes(b"stop")
        for pipe in self._pipes:
            try:
                pipe.send_bytes(STOP_MESSAGE)
            except OSError:
                pass  # that worker is already gone
            pipe.close()
        if parallel_state.get().is_parallel:  # the workers leave the group at the same time
            parallel_state.destroy(timeout_s=5.0)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                logger.warning("tensor-parallel worker %s did not stop; killing it", proc.name)
                proc.kill()
                proc.join(timeout=5)
        atexit.unregister(self.shutdown)

    def _check_workers(self) -> None:
        if self._failure is None:
            for rank, proc in enumerate(self._procs, start=1):
                if proc.exitcode is not None:
                    self._failure = _death_message(rank, proc)
                    break
        if self._failure is not None:
            raise WorkerDiedError(self._failure)

    def _watch(self) -> None:
        """Block until a worker exits (or shutdown), then report it once."""
        by_sentinel = {proc.sentinel: (rank, proc) for rank, proc in enumerate(self._procs, start=1)}
        ready = wait([*by_sentinel, self._wake_reader])
        if self._stopping:
            return
        rank, proc = next(by_sentinel[s] for s in ready if s in by_sentinel)  # type: ignore[index]
        # Another thread may be reaping it at the same moment (its join then reads no code): wait for the code.
        deadline = time.monotonic() + 2
        while proc.exitcode is None and time.monotonic() < deadline:
            proc.join(timeout=0.05)
        message = _death_message(rank, proc)
        self._failure = self._failure or message
        logger.error("%s", message)
        self._on_worker_death(message)


def _death_message(rank: int, proc: BaseProcess) -> str:
    code = proc.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        how = f"signal {signal.Signals(-code).name}"
    return f"tensor-parallel worker rank {rank} (pid {proc.pid}) died ({how})"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    config: EngineConfig, on_worker_death: Callable[[str], None] = _exit_process
) -> TensorParallelExecutor | None:
    """Make this process rank 0 of `config`'s tensor-parallel group (None at size 1); call before loading the
    model, so it is built as rank 0's shard, and give the result to its model runner, which then sends each batch
    to the workers (`StepPublisher`)."""
    size = config.parallel.tensor_parallel_size
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {size}")
    if size == 1:
        return None
    executor = TensorParallelExecutor(config, on_worker_death)
    try:
        executor.start()
    except BaseException:
        executor.shutdown()
        raise
    return executor
