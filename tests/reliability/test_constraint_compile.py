"""Hostile constraints against a real `weir serve` process: a costly compile stops when its request goes, runs
within its budget, never delays health checks or cached constraints, and the compiled-grammar cache keeps server
memory within its budget; constraints over the admission limits are refused INVALID_ARGUMENT naming field and limit.

The costly constraint is a regex of 2 KB that xgrammar compiles for a minute (0.2-0.5 s for each of its 150 distinct
13-byte units): admission limits alone cannot price it, only the compile budget can.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from conftest import Launcher, ServerProcess, tiny_smollm2_models
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_server.engine.structured_config import CACHE_MEMORY_BYTES, COMPILE_TIMEOUT_S, MIB
from weir_server.engine.types import MAX_CONSTRAINT_BYTES, MAX_CONSTRAINT_DEPTH, STRUCTURAL_TAG_EXTRA_DEPTH

# With tiny_smollm2_models: a compile's cost is SmolLM2's vocabulary's, whatever the weights.
# The core on a thread: the memory test measures the compiled grammars' cache in the server process, where a thread
# core keeps them (a core process compiles its own, and the server process keeps only verdicts).
MODELS = ("--max-model-len", "512", "--embed-model", "none", "--engine-core", "thread")
LETTERS = "abcdefghijklmnopqrst"
TAG_DEPTH = MAX_CONSTRAINT_DEPTH + STRUCTURAL_TAG_EXTRA_DEPTH
_salts = iter(range(1, 10**6))


def costly_regex(units: int = 150) -> str:
    """0.2-0.5 s of compile a unit (about 3 MB compiled); new on every call, so no cache helps."""
    salt = next(_salts)
    return "".join(f"[{LETTERS[i % 20]}-z]{{1,{5000 + 1000 * salt + i}}}" for i in range(units))


def nested_schema(levels: int) -> str:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return json.dumps(schema)


def nested_list(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_smollm2: Path) -> Iterator[ServerProcess]:
    launcher = Launcher(tmp_path_factory.mktemp("constraint-server"))
    try:
        yield launcher.server(model_args=tiny_smollm2_models(tiny_smollm2, *MODELS))
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        generate(stub, timeout=120, regex="[0-9]{2}")  # starts the compile workers (a fork server: seconds)
        yield stub


def generate(stub: inference_pb2_grpc.InferenceServiceStub, timeout: float, **fields: Any) -> str:
    """Run one short constrained request; its text, or the RpcError raised."""
    params = fields.pop("sampling_params", pb.SamplingParams(max_tokens=2, temperature=0.0))
    request = pb.GenerateRequest(prompt="Write a value:", sampling_params=params, **fields)
    return "".join(message.text for message in stub.Generate(request, timeout=timeout))


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def violation(error: grpc.RpcError) -> error_details_pb2.BadRequest.FieldViolation:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # a failed call is both an RpcError and a Call
    assert status is not None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0]
    raise AssertionError(f"no BadRequest detail in {error}")


class HealthPoller:
    """Polls grpc.health.v1 Check every 50 ms on a channel of its own and records the slowest answer."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._stop = threading.Event()
        self.worst = 0.0
        self.answers = 0
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._channel.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            reply = self._stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            self.worst = max(self.worst, time.monotonic() - start)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            self.answers += 1
            self._stop.wait(0.05)


def cpu_seconds(pid: int, during: float) -> float:
    """CPU seconds a process and its descendants (the compile workers) spend in the next `during` seconds."""

    def sample() -> dict[int, float]:
        root = psutil.Process(pid)
        times = {}
        for process in [root, *root.children(recursive=True)]:
            try:
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
            except psutil.NoSuchProcess:
                pass
        return times

    before = sample()
    time.sleep(during)
    return sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in sample().items())


def test_a_costly_compile_past_its_deadline_stops_costing_cpu_and_health_stays_prompt(
    server: ServerProcess, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    idle = cpu_seconds(server.process.popen.pid, 1.0)
    with HealthPoller(server.target) as health:
        error = rpc_error(lambda: generate(stub, timeout=2.0, regex=costly_regex()))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)  # the server sees the cancellation and kills the worker
        after = cpu_seconds(server.process.popen.pid, 2.0)
    assert after < 0.3 + 2 * idle, f"{after:.2f} CPU-s in the 2 s after the deadline (idle: {idle:.2f} in 1 s)"
    assert health.answers > 20 and health.worst < 1.0, f"slowest health check {health.worst:.2f}s"
    assert generate(stub, timeout=30, regex="[0-9]{2}")  # still serving constraints


def test_a_cached_constraint_is_answered_promptly_while_a_costly_one_compiles(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    cached = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    generate(stub, timeout=60, json_schema=cached)
    with ThreadPoolExecutor(1) as pool:
        costly = pool.submit(rpc_error, lambda: generate(stub, timeout=6.0, regex=costly_regex()))
        time.sleep(1.0)
        start = time.monotonic()
        generate(stub, timeout=30, json_schema=cached)
        waited = time.monotonic() - start
        assert costly.result().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited < 2.0, f"a cached constraint waited {waited:.2f}s behind a new one"


def test_a_compile_past_the_servers_budget_is_refused_and_the_server_serves_on(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    start = time.monotonic()
    error = rpc_error(lambda: generate(stub, timeout=60, regex=costly_regex()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(error).field == "regex"
    assert f"did not compile within this server's {COMPILE_TIMEOUT_S:g} s limit" in violation(error).description
    assert time.monotonic() - start < COMPILE_TIMEOUT_S + 5
    assert generate(stub, timeout=30, regex="[a-c]{3}")


def _tools_request(parameters: str) -> dict[str, Any]:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="call it")])
    return {"messages": messages, "tools": [pb.Tool(name="f", description="f", parameters=parameters)]}


BYTES_LIMIT = f"the limit is {MAX_CONSTRAINT_BYTES} bytes (--max-constraint-bytes)"
# Deep but few tokens (the test server's context is 512): arrays in the schema's `default`.
DEEP_TOOL = json.dumps({"type": "object", "default": nested_list(100)})
OVER_THE_LIMITS = {
    "grammar": ({"grammar": 'root ::= "' + "a" * MAX_CONSTRAINT_BYTES + '"'}, BYTES_LIMIT),
    "regex": ({"regex": "a" * (MAX_CONSTRAINT_BYTES + 1)}, BYTES_LIMIT),
    "choice": ({"choice": pb.StringList(values=["b" * 70_000] * 2)}, BYTES_LIMIT),
    "json_schema": ({"json_schema": nested_schema(450)}, f"the limit is {MAX_CONSTRAINT_DEPTH} (--max-constraint-"),
    "tools": (_tools_request(DEEP_TOOL), f"the limit is {TAG_DEPTH} (--max-constraint-depth, and"),
}


@pytest.mark.parametrize("field", OVER_THE_LIMITS)
def test_a_constraint_over_the_limits_is_refused_naming_the_field_and_the_limit(
    stub: inference_pb2_grpc.InferenceServiceStub, field: str
) -> None:
    fields, limit = OVER_THE_LIMITS[field]
    start = time.monotonic()
    error = rpc_error(lambda: generate(stub, timeout=30, **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(error).field == field
    assert limit in violation(error).description
    assert time.monotonic() - start < 2.0  # refused before any compile


def test_server_memory_stays_within_the_cache_budget_after_many_distinct_constraints(
    server: ServerProcess, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    # Eight pairs of letters, up to 300 of each: 5.3 MiB compiled in 30 ms. 150 of them hold 1.5 times the budget.
    regexes = ["".join(f"[{c}{chr(ord(c) + 1)}]{{1,{300 + n}}}" for c in LETTERS[:8]) for n in range(150)]
    # An out-of-range temperature is refused after the constraint compiled (and was cached): no tokens to wait for.
    params = pb.SamplingParams(max_tokens=1, temperature=3.0)
    process = psutil.Process(server.process.popen.pid)
    before = process.memory_info().rss

    def send(regex: str) -> grpc.StatusCode:
        return rpc_error(lambda: generate(stub, timeout=30, regex=regex, sampling_params=params)).code()

    start = time.monotonic()
    codes = {send(regex) for regex in regexes}
    grown = process.memory_info().rss - before
    took = time.monotonic() - start
    print(f"[constraint-memory] {len(regexes)} constraints in {took:.1f}s, server RSS +{grown / MIB:.0f} MiB")
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    assert grown > CACHE_MEMORY_BYTES // 2, f"only {grown / MIB:.0f} MiB: did the constraints compile?"
    assert grown < CACHE_MEMORY_BYTES + 96 * MIB, f"the server grew {grown / MIB:.0f} MiB"


def test_sigterm_during_a_costly_compile_exits_within_the_drain_timeout(tmp_path: Path, tiny_smollm2: Path) -> None:
    launcher = Launcher(tmp_path)
    try:
        server = launcher.server("--drain-timeout", "5", model_args=tiny_smollm2_models(tiny_smollm2, *MODELS))
        with grpc.insecure_channel(server.target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with ThreadPoolExecutor(1) as pool:
                pool.submit(rpc_error, lambda: generate(stub, timeout=120, regex=costly_regex()))
                time.sleep(4.0)  # the fork server starts and the compile runs
                start = time.monotonic()
                server.process.signal(15)
                code = server.process.wait(timeout=30)
        assert code == 0
        assert time.monotonic() - start < 5 + 5
    finally:
        launcher.close()
