"""The targets of a run: how each is brought up (started, connected or loaded), measured, and torn down."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from weir_bench.load import Driver
from weir_bench.peers import TargetError, default_gguf, start_llama_server, start_weir_server

logger = logging.getLogger(__name__)

TARGETS = ("grpc", "inprocess", "openai", "llama-server")


@dataclass(frozen=True)
class Target:
    """How to bring one target up for a run; `opener(slots)` yields its driver and tears it down after."""

    name: str
    opener: Callable[[int], AbstractAsyncContextManager[Driver]]
    restart_per_level: bool = False  # llama-server is sized by its slot count, so it restarts per concurrency


def weir_server_args(args: argparse.Namespace) -> list[str]:
    extra = shlex.split(args.server_args)
    # Generation only, like the peers: an embedding model would add to the server's memory and load time.
    return extra if any(a.startswith("--embed-model") for a in extra) else [*extra, "--embed-model", "none"]


def plan_targets(args: argparse.Namespace, ctx_per_slot: int) -> list[Target]:
    """The targets `args.target` names, in that order; `ctx_per_slot` sizes llama-server's context."""
    # Drivers are imported by the targets that use them: gRPC needs only the client's dependencies, HTTP
    # targets need aiohttp (the gateway extra), the in-process target needs the server (torch).
    from weir_bench.grpc_driver import GrpcDriver, grpc_ready

    @contextlib.asynccontextmanager
    async def grpc_target(_: int) -> AsyncIterator[Driver]:
        proc = None
        address, pid = args.address, args.server_pid
        if args.start_server:
            proc, address = await start_weir_server(weir_server_args(args), grpc_ready, args.server_timeout)
            pid = proc.pid
        elif not await _wait_for(lambda: grpc_ready(address), args.wait, f"Weir server at {address}"):
            raise TargetError(
                f"no Weir server with a generation model answered at {address} within "
                f"{args.wait:.0f}s (or use --start-server)"
            )
        driver = GrpcDriver(address, model=args.model, pid=pid, temperature=args.temperature, timeout_s=args.timeout)
        try:
            yield driver
        finally:
            await driver.close()
            if proc is not None:
                proc.stop()

    @contextlib.asynccontextmanager
    async def inprocess_target(_: int) -> AsyncIterator[Driver]:
        from weir_bench.inprocess import InProcessDriver

        driver = await InProcessDriver.start(weir_server_args(args), args.temperature)
        try:
            yield driver
        finally:
            await driver.close()

    @contextlib.asynccontextmanager
    async def openai_target(_: int) -> AsyncIterator[Driver]:
        from weir_bench.openai_driver import OpenAIDriver

        driver = OpenAIDriver(
            args.openai_url,
            model=args.openai_model,
            pid=args.openai_pid,
            temperature=args.temperature,
            timeout_s=args.timeout,
            api_key=args.api_key,
        )
        try:
            if not await _wait_for(driver.ready, args.wait, f"server at {args.openai_url}"):
                raise TargetError(f"GET {driver.base}/v1/models did not succeed within {args.wait:.0f}s")
            await driver.resolve_model()
            yield driver
        finally:
            await driver.close()

    llama_args = shlex.split(args.llama_server_args)

    @contextlib.asynccontextmanager
    async def llama_target(slots: int) -> AsyncIterator[Driver]:
        from weir_bench.openai_driver import OpenAIDriver

        gguf = args.gguf or default_gguf()
        proc, url = await start_llama_server(
            args.llama_server_bin, gguf, slots, ctx_per_slot, args.threads, llama_args, args.server_timeout
        )
        if "--no-repack" in proc.argv and "--no-repack" not in llama_args:
            llama_args.append("--no-repack")  # it had to be retried; start the next levels that way at once
        driver = OpenAIDriver(
            url, name="llama-server", pid=proc.pid, temperature=args.temperature, timeout_s=args.timeout
        )
        try:
            await driver.resolve_model()
            yield driver
        finally:
            await driver.close()
            proc.stop()

    targets = {
        "grpc": Target("weir-grpc", grpc_target),
        "inprocess": Target("weir-inprocess", inprocess_target),
        "openai": Target("openai", openai_target),
        "llama-server": Target("llama-server", llama_target, restart_per_level=True),
    }
    return [targets[name] for name in args.target]


async def _wait_for(probe: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> bool:
    """Poll `probe` for up to `timeout_s` seconds; say once that we are waiting."""
    deadline = time.monotonic() + timeout_s
    if await probe():
        return True
    logger.info("waiting up to %.0fs for the %s", timeout_s, what)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        if await probe():
            return True
    return False


class VocabBound:
    """The bound on prompt ids: --vocab-size, else the first target's vocabulary, so all targets get one prompt set."""

    def __init__(self, given: int | None) -> None:
        self.value = given
        self._given = given is not None

    async def resolve(self, driver: Driver) -> int:
        reported = None if self._given else await driver.vocab_size()
        if self.value is None:
            if not reported:
                raise TargetError(
                    f"{driver.name} does not report its vocabulary size; pass --vocab-size "
                    "(or list a target that reports it, such as grpc, first)"
                )
            self.value = reported
        elif reported and reported != self.value:
            logger.warning(
                "%s has a vocabulary of %d but this run's prompts are drawn below %d (the first "
                "target's); are they serving the same model?",
                driver.name,
                reported,
                self.value,
            )
        return self.value
