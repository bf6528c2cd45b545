"""A tensor-parallel worker process: joins the group, loads its shard, then runs every batch rank 0 sends.

The loop mirrors rank 0's engine step by step (same `ModelRunner.execute`, so the same collectives in the
same order); the logits it gathers are dropped, since only rank 0 samples. Any failure ends the process,
which rank 0 notices; so does the end of rank 0, which this process notices and follows.
"""

from __future__ import annotations

import logging
import os
from multiprocessing.connection import Connection

import torch

from weir_server.config import EngineConfig
from weir_server.distributed import parallel_state
from weir_server.process_lifetime import exit_with_parent

logger = logging.getLogger(__name__)


def run_worker(
    rank: int, world_size: int, init_method: str, config: EngineConfig, steps: Connection, log_level: int
) -> None:
    """The worker's main: rank `rank` of `world_size`, on `config.model.device`, fed batches over `steps`."""
    from weir_server.executor.model_runner import ModelRunner
    from weir_server.executor.tp_executor import STOP_MESSAGE, run_message
    from weir_server.models.loader import load_model

    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s", force=True
    )
    exit_with_parent()  # even while blocked in a collective that will never finish
    try:
        device = torch.device(config.model.device)
        parallel_state.initialize(rank, world_size, init_method, device, config.parallel.collective_timeout_s)
        loaded = load_model(config.model, "generate", lora=config.lora is not None)
        runner = ModelRunner(loaded, config)
        logger.info("ready")
        while (data := steps.recv_bytes()) != STOP_MESSAGE:
            run_message(runner, data)  # a step's batch, or a LoRA slot to fill
    except EOFError:
        logger.info("rank 0 closed the step pipe; exiting")
    except Exception:  # any failure leaves the group out of step: report it and die, rank 0 takes it from there
        logger.exception("tensor-parallel worker failed")
        _exit(1)
    parallel_state.destroy(timeout_s=5.0)
    _exit(0)


def _exit(code: int) -> None:
    """End the process now: interpreter teardown of CUDA graphs and NCCL state can stall, and nothing here
    needs it."""
    logging.shutdown()
    os._exit(code)
