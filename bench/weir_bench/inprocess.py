"""Drive `AsyncEngine` directly in this process, with no gRPC, so the cost of the server layer shows."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from weir_bench.engines import async_engine
from weir_bench.load import RequestTiming
from weir_bench.peers import TargetError

logger = logging.getLogger(__name__)


def engine_config_from_server_args(server_args: Sequence[str]) -> Any:
    """The EngineConfig `weir serve <server_args>` would build, so in-process and gRPC runs match."""
    from weir_server.cli import build_parser, config_from_args

    config = config_from_args(build_parser(prog="weir bench --server-args").parse_args(list(server_args)))
    if config.generate is None:
        raise TargetError("--server-args disable the generation model; the in-process target needs one")
    return config.generate


class InProcessDriver:
    """Loads the generation model with `load_model` and streams from an `AsyncEngine` in this event loop."""

    def __init__(self, engine: Any, temperature: float = 0.0, name: str = "weir-inprocess") -> None:
        self.name = name
        self.temperature = temperature
        self.engine = engine  # the AsyncEngine (weir_bench.engines.core_of reaches its core)
        self._ids = itertools.count()

    @classmethod
    async def start(cls, server_args: Sequence[str] = (), temperature: float = 0.0) -> InProcessDriver:
        """Load the model `server_args` name (default: the packaged SmolLM2) and start its engine."""
        from weir_server.errors import WeirError
        from weir_server.models.loader import load_model
        from weir_server.process_lifetime import freeze_startup_objects

        config = engine_config_from_server_args(server_args)
        logger.info("loading %s in-process", config.model.model)
        try:
            loaded = await asyncio.to_thread(load_model, config.model, "generate")
            engine = async_engine(loaded, config)
            await engine.start()
        except WeirError as exc:
            raise TargetError(f"in-process engine: {exc}") from exc
        freeze_startup_objects()  # as `weir serve` does once its models are loaded; undone by close()
        return cls(engine, temperature)

    def peak_rss_pid(self) -> int | None:
        return os.getpid()  # the engine lives here, so this process's peak is the engine's (plus the harness)

    async def vocab_size(self) -> int | None:
        return int(self.engine.vocab_size)

    async def generate(self, prompt: list[int], output_tokens: int) -> RequestTiming:
        from weir_server.engine.types import FinishReason, GenerationRequest, SamplingParams
        from weir_server.errors import WeirError

        params = SamplingParams(
            max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True, temperature=self.temperature
        )
        request = GenerationRequest(f"bench-{next(self._ids)}", list(prompt), params, arrival_time=time.monotonic())
        timing = RequestTiming.begin()
        server_count: int | None = None
        try:
            async for output in self.engine.generate(request):
                timing.record(len(output.token_ids))
                if output.finish_reason is FinishReason.ERROR:
                    return timing.finish(error=output.error or "engine error")
                if output.usage is not None:
                    server_count = output.usage.completion_tokens
                    timing.cached_tokens = output.usage.cached_tokens
        except WeirError as exc:
            return timing.finish(error=f"{type(exc).__name__}: {exc}")
        return timing.finish(server_count)

    async def close(self) -> None:
        await self.engine.shutdown()
        gc.unfreeze()  # the engine's objects become collectable again
