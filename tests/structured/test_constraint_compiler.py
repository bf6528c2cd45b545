"""ConstraintCompiler's bounds: new constraints compile in killable workers within a time budget and a memory limit,
a compile nobody waits for stops, cached ones never wait, and the cache is bounded by bytes."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import torch
from structured_support import SMOLLM2_EOS, SMOLLM2_VOCAB_SIZE, costly_regex

from weir_server.engine.grammar_compiler import ConstraintCompiler, GrammarCache
from weir_server.engine.grammar_worker import CompileAbandoned
from weir_server.engine.structured import StructuredOutputs
from weir_server.engine.structured_config import MIB, StructuredOutputConfig
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError, QueueFullError

MakeCompiler = Callable[..., ConstraintCompiler]


@pytest.fixture
def make_compiler(smollm2_tokenizer: Any) -> Iterator[MakeCompiler]:
    """Compilers with config fields of the test's own; their workers are killed after the test."""
    made: list[ConstraintCompiler] = []

    def make(**config: Any) -> ConstraintCompiler:
        made.append(ConstraintCompiler(smollm2_tokenizer, SMOLLM2_VOCAB_SIZE, (SMOLLM2_EOS,), config_of(**config)))
        return made[-1]

    yield make
    for compiler in made:
        compiler.shutdown()


def config_of(**fields: Any) -> StructuredOutputConfig:
    return StructuredOutputConfig(**({"compile_workers": 1} | fields))


def worker_cpu_seconds(during: float) -> float:
    """CPU seconds this process's descendants (the compile workers) spend in the next `during` seconds."""

    def sample() -> dict[int, float]:
        times = {}
        for child in psutil.Process().children(recursive=True):
            try:
                cpu = child.cpu_times()
                times[child.pid] = cpu.user + cpu.system
            except psutil.NoSuchProcess:
                pass
        return times

    before = sample()
    time.sleep(during)
    after = sample()
    return sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())


def refused(call: Callable[[], Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as error:
        call()
    return error.value


def test_a_compile_past_its_budget_is_refused_naming_the_budget(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler(compile_timeout_s=1.0)
    compiler.compile(Constraint("regex", "[0-9]+"))  # the workers are up
    start = time.monotonic()
    error = refused(lambda: compiler.compile(Constraint("regex", costly_regex(40))))
    assert error.field == "regex"
    assert "did not compile within this server's 1 s limit" in error.description
    assert time.monotonic() - start < 4


def test_a_killed_worker_is_replaced_and_the_next_constraint_compiles(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler(compile_timeout_s=0.5)
    refused(lambda: compiler.compile(Constraint("regex", costly_regex(40))))
    assert compiler.compile(Constraint("regex", "id-[0-9]{3}")) is not None
    assert worker_cpu_seconds(0.5) < 0.1


def test_a_compile_nobody_waits_for_stops_using_cpu(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler()
    compiler.compile(Constraint("regex", "[0-9]+"))
    compilation = compiler.start(Constraint("regex", costly_regex(40)))
    assert worker_cpu_seconds(1.0) > 0.3  # it runs
    compilation.release()
    time.sleep(0.3)  # the worker is killed and a fresh one forked
    assert worker_cpu_seconds(1.0) < 0.1
    with pytest.raises(CompileAbandoned):
        compilation.future.result(timeout=5)


def test_a_compile_two_requests_wait_for_survives_one_of_them_leaving(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler()
    constraint = Constraint("regex", costly_regex(1))
    first, second = compiler.start(constraint), compiler.start(constraint)
    first.release()
    assert second.future.result(timeout=30) is not None
    second.release()
    assert compiler.cached(constraint) is not None


def test_cached_and_cheap_constraints_never_wait_behind_a_costly_compile(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler()
    cached = Constraint("json_schema", '{"type": "object", "properties": {"n": {"type": "integer"}}}')
    compiler.compile(cached)
    costly = compiler.start(Constraint("regex", costly_regex(40)))
    time.sleep(0.3)
    start = time.monotonic()
    compiler.compile(cached)
    compiler.compile(Constraint("choice", ("yes", "no")))  # short choices compile here, without a worker
    assert time.monotonic() - start < 0.5
    costly.release()


def test_too_many_new_constraints_waiting_for_a_worker_are_refused(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler(compile_queue=1)
    running = compiler.start(Constraint("regex", costly_regex(40)))
    time.sleep(0.3)  # taken by the worker
    waiting = compiler.start(Constraint("regex", costly_regex(40, salt=1)))
    with pytest.raises(QueueFullError):
        compiler.start(Constraint("regex", costly_regex(40, salt=2)))
    waiting.release()
    running.release()


def test_a_grammar_over_the_memory_limit_of_one_constraint_is_refused(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler(max_compiled_bytes=MIB // 2, cache_memory_bytes=MIB)
    error = refused(lambda: compiler.compile(Constraint("regex", "a{1,1000}")))  # 0.8 MiB compiled
    assert error.field == "regex"
    assert error.description.endswith("the limit for one constraint is 0.5 MiB (--max-compiled-constraint-mb)")


def test_a_compile_that_needs_more_memory_than_a_worker_may_map_is_refused(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler(worker_memory_bytes=16 * MIB)
    error = refused(lambda: compiler.compile(Constraint("regex", costly_regex(20))))  # 70 MiB compiled
    assert error.field == "regex"
    assert "needs more memory to compile than this server allows" in error.description


def test_the_cache_evicts_the_least_recently_used_past_its_byte_budget() -> None:
    cache = GrammarCache(max_bytes=100)
    grammars = {name: object() for name in "abcd"}
    for name in "abc":
        cache.put(Constraint("regex", name), grammars[name], 40)  # type: ignore[arg-type]  # stands for a grammar
    assert cache.bytes == 80 and len(cache) == 2  # a went
    assert cache.get(Constraint("regex", "b")) is grammars["b"]  # b is now the most recent
    cache.put(Constraint("regex", "d"), grammars["d"], 40)  # type: ignore[arg-type]
    assert cache.get(Constraint("regex", "c")) is None and cache.get(Constraint("regex", "b")) is not None


def test_many_distinct_constraints_keep_memory_within_the_cache_budget(make_compiler: MakeCompiler) -> None:
    budget = 16 * MIB
    compiler = make_compiler(cache_memory_bytes=budget, max_compiled_bytes=budget)
    compiler.compile(Constraint("regex", "a{1,999}"))
    base = resident_bytes()
    for n in range(1000, 1060):  # 0.8 MiB each: 50 MiB compiled in all
        compiler.compile(Constraint("regex", f"a{{1,{n}}}"))
    assert compiler.cache.bytes <= budget
    assert 10 <= len(compiler.cache) <= 20
    assert resident_bytes() - base < budget + 16 * MIB


def resident_bytes() -> int:
    """This process's RSS once freed memory has gone back to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def test_shutdown_kills_the_workers_at_once_and_fails_their_compiles(make_compiler: MakeCompiler) -> None:
    compiler = make_compiler()
    compilation = compiler.start(Constraint("regex", costly_regex(40)))
    time.sleep(0.5)
    start = time.monotonic()
    compiler.shutdown()
    assert time.monotonic() - start < 1
    with pytest.raises(CompileAbandoned):
        compilation.future.result(timeout=5)
    with pytest.raises(CompileAbandoned):
        compiler.start(Constraint("regex", "[0-9]"))


def test_cancelling_prepare_ends_its_compile(smollm2_tokenizer: Any) -> None:
    structured = StructuredOutputs(
        smollm2_tokenizer, SMOLLM2_VOCAB_SIZE, (SMOLLM2_EOS,), torch.device("cpu"), config_of()
    )

    async def prepare_with_deadline() -> None:
        await structured.prepare(Constraint("regex", "[0-9]+"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(structured.prepare(Constraint("regex", costly_regex(40))), timeout=1.0)

    asyncio.run(prepare_with_deadline())
    time.sleep(0.3)
    assert worker_cpu_seconds(1.0) < 0.1
    structured.shutdown()


def test_prepare_refuses_a_bad_constraint_naming_its_kind(smollm2_tokenizer: Any) -> None:
    structured = StructuredOutputs(smollm2_tokenizer, SMOLLM2_VOCAB_SIZE, (SMOLLM2_EOS,), torch.device("cpu"))
    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(structured.prepare(Constraint("regex", "(ab")))
    assert error.value.field == "regex"
    structured.shutdown()
