"""Loading, using and unloading a LoRA adapter while 16 streams run (half on the base model, half on an adapter loaded
at start): no stream fails, and each one's greedy output is exactly what it gets alone (no request mixed up with
another's adapter). In float32: the random model's next-token distribution is nearly flat, and in bfloat16 its top
two logits often tie, so rounding that depends on the batch's make-up could flip a greedy choice."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lora_adapters import ALL_PROJECTIONS, make_adapter
from tiny_models import make_tiny_model

from weir_client import WeirClient
from weir_server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, ServerConfig

pytestmark = pytest.mark.timeout(600)

STREAMS = 16
LONG: dict[str, Any] = {"max_tokens": 160, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, packaged_model_paths: Any, start_server: Any
) -> Iterator[tuple[WeirClient, Path]]:
    root = tmp_path_factory.mktemp("lora-load")
    base = make_tiny_model(root / "base", packaged_model_paths.minilm_dir)
    steady = make_adapter(base, root / "steady", rank=8, seed=11)
    late = make_adapter(base, root / "late", rank=16, seed=12, targets=ALL_PROJECTIONS)
    generate = EngineConfig(
        ModelConfig(str(base), served_name="tiny", load_format="dummy", dtype="float32", max_model_len=512),
        cache=CacheConfig(num_blocks=1024),
        lora=LoRAConfig(max_lora_rank=16, max_loras=2, lora_modules=(("steady", str(steady)),)),
    )
    server = start_server(ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=None))
    with WeirClient(server.target, timeout=300) as client:
        yield client, late


def stream_model(i: int) -> str:
    return "steady" if i % 2 else "tiny"


def prompt(i: int) -> str:
    return f"Stream number {i} tells a long story about the number {i * 7}:"


def test_load_use_and_unload_under_16_streams_mix_up_nothing(setup: tuple[WeirClient, Path]) -> None:
    client, late = setup
    alone = [client.complete(prompt(i), model=stream_model(i), **LONG).choices[0].token_ids for i in range(STREAMS)]
    client.load_adapter("late", str(late))
    late_alone = client.complete("A late adapter says", model="late", **LONG).choices[0].token_ids
    client.unload_adapter("late")

    started = [threading.Event() for _ in range(STREAMS)]
    outputs: list[list[int]] = [[] for _ in range(STREAMS)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for chunk in client.generate(prompt(i), model=stream_model(i), **LONG):
                outputs[i] += chunk.token_ids
                started[i].set()
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)
            started[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(120)
    client.load_adapter("late", str(late))
    late_under_load = client.complete("A late adapter says", model="late", **LONG).choices[0].token_ids
    client.unload_adapter("late")
    for thread in threads:
        thread.join(300)

    assert not errors, errors
    assert late_under_load == late_alone
    for i in range(STREAMS):
        assert outputs[i] == alone[i], f"stream {i} ({stream_model(i)}) differs from its output alone"
    assert "late" not in {a.name for a in client.list_adapters()}
