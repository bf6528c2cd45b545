"""Hostile inputs against a real `weir serve` process (issue 23): whatever a request asks, the event loop keeps
answering (a health check polled every 50 ms never waits about a second), a request over a limit is refused before
its work, a request past its deadline stops using CPU, and SIGTERM during any of them exits within the drain
timeout. The server runs with small limits so each case takes a few seconds; the shapes are the issue's (a huge
Tokenize, a million empty turns, hundreds of long Embed texts, megabyte prompts, millions of ids to detokenize)."""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import (
    HEALTH_BOUND_S,
    HealthProbe,
    Launcher,
    ServerProcess,
    Tally,
    cpu_seconds,
    keyed_channel,
    tiny_smollm2_models,
)
from secret_scan import random_key

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub

MAX_TEXT_BYTES = 1 << 20  # the default
DRAIN_TIMEOUT_S = 3.0
SERVER_FLAGS = ("--frontend-threads", "2")  # the default limits
# With tiny_smollm2_models: the hostile work is SmolLM2's tokenizer and chat template and MiniLM, not generation.
MODELS = ("--max-model-len", "2048", "--embed-model", "all-minilm-l6-v2")
KEY = random_key("hostile")  # every call carries it (health stays open): hostile input from a keyed client
CONCURRENT = 4  # hostile calls at once: twice the server's worker threads
BIG_MESSAGES = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    running = Launcher(tmp_path_factory.mktemp("hostile"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The key in a file (--api-key-file), so the key-file path is covered by the session's search of the logs."""
    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text(f"# the hostile-input server's key\n{KEY}\n")
    return path


@pytest.fixture(scope="module")
def server(launcher: Launcher, key_file: Path, tiny_smollm2: Path) -> ServerProcess:
    return launcher.server(
        *SERVER_FLAGS, "--api-key-file", str(key_file), model_args=tiny_smollm2_models(tiny_smollm2, *MODELS)
    )


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[InferenceServiceStub]:
    with keyed_channel(server.target, KEY, options=BIG_MESSAGES) as channel:
        yield InferenceServiceStub(channel)


def _turns(n: int, text: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text) for _ in range(n)])


def _words(n_bytes: int, seed: int = 0) -> str:
    """Text of made-up words, so the tokenizer's cache of words seen does not make it cheap."""
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < n_bytes:
        words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))))
        size += len(words[-1]) + 1
    return " ".join(words)[:n_bytes]


# Work the limits admit, each a few hundred milliseconds to seconds of CPU: (rpc, request).
ADMITTED: dict[str, tuple[str, Any]] = {
    "tokenize-at-the-text-limit": (
        "Tokenize",
        pb.TokenizeRequest(texts=[_words(MAX_TEXT_BYTES // 4, seed) for seed in range(4)], return_offsets=True),
    ),
    "chat-of-4096-turns": ("Generate", pb.GenerateRequest(messages=_turns(4096, _words(100)))),
    "embed-of-16-texts": ("Embed", pb.EmbedRequest(texts=[_words(400, seed) for seed in range(16)])),
    "prompts-too-long-for-the-context": ("Generate", pb.GenerateRequest(prompt=_words(500_000))),
    "detokenize-of-a-million-ids": (
        "Detokenize",
        pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=[1000 + i % 40_000 for i in range(1 << 18)])] * 4),
    ),
}
# The shapes, each over a limit: (rpc, request, field).
OVER_LIMITS: dict[str, tuple[str, Any, str]] = {
    "tokenize-of-8-mb": ("Tokenize", pb.TokenizeRequest(texts=["x" * (8 << 20)]), "texts"),
    "a-million-empty-turns": (
        "Generate",
        pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage()] * 1_000_000)),
        "messages",
    ),
    "embed-of-400-long-texts": ("Embed", pb.EmbedRequest(texts=[_words(20_000)] * 400), "texts"),
    "prompt-of-2m-characters": ("Generate", pb.GenerateRequest(prompt="y" * 2_000_000), "prompt"),
    "detokenize-of-5m-ids": (
        "Detokenize",
        pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=[7] * 5_000_000)]),
        "sequences",
    ),
    "chat-template-kwargs-of-1-mb": (
        "Generate",
        pb.GenerateRequest(messages=_turns(1, "hi"), chat_template_kwargs='{"a": "' + "x" * (1 << 20) + '"}'),
        "chat_template_kwargs",
    ),
    "tools-of-4-mb": (
        "Generate",
        pb.GenerateRequest(messages=_turns(1, "hi"), tools=[pb.Tool(name="f", description="d" * (4 << 20))]),
        "tools",
    ),
    "tokenize-of-100k-empty-texts": ("Tokenize", pb.TokenizeRequest(texts=[""] * 100_000), "texts"),
}


def _call(stub: InferenceServiceStub, rpc: str, request: Any, timeout: float = 120) -> grpc.StatusCode:
    """Run one call to its end; the status it ended with (OK included)."""
    try:
        result = getattr(stub, rpc)(request, timeout=timeout)
        if rpc == "Generate":
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def _at_once(calls: list[Callable[[], grpc.StatusCode]]) -> list[grpc.StatusCode]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


@pytest.mark.parametrize("case", list(ADMITTED))
def test_health_answers_promptly_while_hostile_work_runs(
    server: ServerProcess, stub: InferenceServiceStub, case: str
) -> None:
    rpc, request = ADMITTED[case]
    tally = Tally(f"hostile-work-{case}")
    cpu_before = cpu_seconds(server.process.popen.pid)
    with HealthProbe(server.target) as probe:
        codes = _at_once([lambda: _call(stub, rpc, request)] * CONCURRENT)
    tally.sent = CONCURRENT
    tally.answered = codes.count(grpc.StatusCode.OK)
    tally.info = {
        "worst_health_s": f"{probe.worst:.3f}",
        "server_cpu_s": f"{cpu_seconds(server.process.popen.pid) - cpu_before:.2f}",
    }
    tally.report()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert probe.statuses == {"SERVING"}
    assert probe.worst < HEALTH_BOUND_S, f"a health check waited {probe.worst:.2f}s"


@pytest.mark.parametrize("case", list(OVER_LIMITS))
def test_an_input_over_a_limit_is_refused_before_its_work(
    server: ServerProcess, stub: InferenceServiceStub, case: str
) -> None:
    rpc, request, name = OVER_LIMITS[case]
    pid = server.process.popen.pid
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    with HealthProbe(server.target) as probe:
        try:
            result = getattr(stub, rpc)(request, timeout=60)
            list(result) if rpc == "Generate" else None
            pytest.fail("the request was served")
        except grpc.RpcError as e:
            error = e
    took, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu_before
    print(f"[over-limit-{case}] took={took:.3f}s server_cpu={cpu:.2f}s worst_health={probe.worst:.3f}s")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert (error.details() or "").startswith(f"{name}: ") and "limit" in (error.details() or "")
    assert took < 2.0  # the bytes on the wire included
    assert cpu < 1.0
    assert probe.worst < HEALTH_BOUND_S


# Work that would run for seconds, in many steps: (rpc, request).
LONG_WORK: dict[str, tuple[str, Any]] = {
    "tokenize": ("Tokenize", pb.TokenizeRequest(texts=[_words(MAX_TEXT_BYTES // 16, seed) for seed in range(16)])),
    "chat": ADMITTED["chat-of-4096-turns"],
    "embed": ("Embed", pb.EmbedRequest(texts=[_words(200, seed) for seed in range(2048)])),
    "detokenize": ADMITTED["detokenize-of-a-million-ids"],
}
DEADLINE_S = 0.3


@pytest.mark.parametrize("case", list(LONG_WORK))
def test_a_call_past_its_deadline_stops_using_cpu(server: ServerProcess, stub: InferenceServiceStub, case: str) -> None:
    rpc, request = LONG_WORK[case]
    pid = server.process.popen.pid
    codes = _at_once([lambda: _call(stub, rpc, request, timeout=DEADLINE_S)] * CONCURRENT)
    time.sleep(1.0)  # a step already running when the deadline passed may finish
    settled = cpu_seconds(pid)
    time.sleep(1.5)
    after = cpu_seconds(pid) - settled
    print(f"[deadline-{case}] codes={[c.name for c in codes]} cpu_in_1.5s_after={after:.2f}s")
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert after < 0.15, f"{after:.2f} CPU-seconds spent after every call's deadline"


def test_a_call_its_client_cancels_stops_using_cpu(server: ServerProcess, stub: InferenceServiceStub) -> None:
    rpc, request = LONG_WORK["tokenize"]
    pid = server.process.popen.pid
    calls = [getattr(stub, rpc).future(request, timeout=60) for _ in range(CONCURRENT)]
    time.sleep(DEADLINE_S)
    for call in calls:
        call.cancel()
    time.sleep(1.0)
    settled = cpu_seconds(pid)
    time.sleep(1.5)
    after = cpu_seconds(pid) - settled
    print(f"[cancelled-tokenize] cpu_in_1.5s_after={after:.2f}s")
    assert all(call.cancelled() for call in calls)
    assert after < 0.15, f"{after:.2f} CPU-seconds spent after every call was cancelled"


def test_sigterm_during_hostile_work_exits_within_the_drain_timeout(
    launcher: Launcher, key_file: Path, tiny_smollm2: Path
) -> None:
    flags = (*SERVER_FLAGS, "--drain-timeout", str(DRAIN_TIMEOUT_S), "--api-key-file", str(key_file))
    server = launcher.server(*flags, model_args=tiny_smollm2_models(tiny_smollm2, *MODELS))
    work = [*ADMITTED.values(), *LONG_WORK.values()]
    with keyed_channel(server.target, KEY, options=BIG_MESSAGES) as channel:
        stub = InferenceServiceStub(channel)
        with ThreadPoolExecutor(len(work)) as pool:
            calls = [pool.submit(_call, stub, rpc, request) for rpc, request in work]
            time.sleep(0.5)
            signalled = time.monotonic()
            server.process.signal(15)
            code = server.process.wait(timeout=60)
            took = time.monotonic() - signalled
            codes = [c.result() for c in calls]
    print(f"[sigterm-during-hostile-work] exit={code} took={took:.2f}s codes={sorted({c.name for c in codes})}")
    assert code == 0, server.process.log[-2000:]
    assert "Traceback" not in server.process.log, server.process.log[-3000:]
    # The drain, then the aborted calls' statuses and the exit itself (its worker pools joined): 2.56 s past the
    # drain was seen once in a full suite run on the 2-core host, where 2.5 s was the bound.
    assert took < DRAIN_TIMEOUT_S + 4, server.process.log[-3000:]
