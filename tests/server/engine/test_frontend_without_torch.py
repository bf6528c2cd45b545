"""`weir serve --engine-core process` with only a generation model: the server process (gRPC, tokenizer, constraint
checks) never loads torch, the core process does, and generation, constrained generation and the refusal of a bad
constraint work through it. A real `weir serve` of the packaged SmolLM2 on a loopback port."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from weir_client import WeirClient, WeirClientError

pytestmark = pytest.mark.timeout(240)

WEIR = Path(sys.executable).parent / "weir"
READY = re.compile(r"Weir is ready on (\S+):(\d+)")


def loads_torch(pid: int) -> bool:
    """Whether a process has torch's shared library mapped (an `import torch` maps it)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def children(pid: int) -> list[int]:
    """A process's children, whichever of its threads started them."""
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`weir serve smollm2-135m-instruct --engine-core process`, ready; yields the process and its target."""
    argv = [str(WEIR), "serve", "smollm2-135m-instruct", "--engine-core", "process", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--num-threads", "1", "--max-model-len", "512", "--kv-cache-memory-gb", "0.25"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr or ()], daemon=True).start()
    try:
        log: list[str] = []
        while (ready := READY.search(log[-1] if log else "")) is None:
            try:
                log.append(lines.get(timeout=180))
            except queue.Empty:
                pytest.fail(f"weir serve did not become ready: {log[-5:]}")
            assert process.poll() is None, f"weir serve exited: {log[-5:]}"
        yield process, f"{ready[1]}:{ready[2]}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_server_process_generates_without_loading_torch(served: tuple[subprocess.Popen[str], str]) -> None:
    process, target = served
    with WeirClient(target, timeout=60) as client:
        done = client.complete("The capital of France is", max_tokens=8, temperature=0)
    assert done.text.strip() and done.choices[0].finish_reason in ("length", "stop")
    assert not loads_torch(process.pid)
    assert any(loads_torch(child) for child in children(process.pid))  # the core's process


def test_constraints_are_checked_and_followed_without_torch_in_the_server_process(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    process, target = served
    with WeirClient(target, timeout=60) as client:
        answer = client.complete("Is water wet? Answer:", choice=["yes", "no"], max_tokens=4, temperature=0)
        with pytest.raises(WeirClientError) as refused:
            client.complete("Hi", json_schema='{"type": "objectx"}', max_tokens=4)
    assert answer.text in ("yes", "no")
    assert refused.value.field == "json_schema" and "objectx" in refused.value.message
    assert not loads_torch(process.pid)  # the vetting ran in worker processes
