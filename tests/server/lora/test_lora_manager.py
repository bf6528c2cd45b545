"""The LoRA slot manager: least-recently-used slots, pinned while running, freed after unloading."""

from __future__ import annotations

import pytest

from weir_server.config import LoRAConfig
from weir_server.engine.lora_manager import LoadedAdapter, LoRAManager
from weir_server.engine.types import AdapterInfo
from weir_server.errors import InvalidRequestError, NotFoundError
from weir_server.executor.lora_checkpoint import LoRAWeights


def _adapter(name: str) -> LoadedAdapter:
    return LoadedAdapter(
        AdapterInfo(name, f"/{name}", 4, 8.0, ("q_proj",), "base"), LoRAWeights(4, 8.0, ()), hash(name)
    )


@pytest.fixture
def manager():
    loads: list[tuple[int, str]] = []
    manager = LoRAManager(LoRAConfig(max_loras=2, max_cpu_loras=3), lambda slot, w: loads.append((slot, w)))
    adapters = {name: _adapter(name) for name in "abc"}
    for adapter in adapters.values():
        manager.add(adapter)
    return manager, adapters, loads


def test_the_least_recently_released_slot_is_reused_first(manager):
    manager, adapters, loads = manager
    a, b, c = adapters.values()
    assert (manager.acquire(a), manager.acquire(b)) == (0, 1)
    assert not manager.can_acquire(c)  # both slots pinned by running sequences
    manager.release(b)
    manager.release(a)  # a used more recently than b
    assert manager.acquire(c) == 1 and b.slot == -1
    assert manager.acquire(a) == 0 and len(loads) == 3  # a still resident: no reload


def test_unloaded_adapters_keep_their_slot_until_their_sequences_end(manager):
    manager, adapters, _ = manager
    a = adapters["a"]
    manager.acquire(a)
    a.sequences.add(1)
    manager.remove("a")
    with pytest.raises(NotFoundError):
        manager.get("a")
    assert manager.slots[0] is a and manager.num_unloading == 1
    manager.release(a)
    a.sequences.clear()
    manager.collect()
    assert manager.slots[0] is None and manager.num_unloading == 0


def test_host_memory_holds_at_most_max_cpu_loras(manager):
    manager, _, _ = manager
    with pytest.raises(InvalidRequestError, match="--max-cpu-loras"):
        manager.add(_adapter("d"))


def test_config_limits_are_checked():
    with pytest.raises(ValueError, match="--max-loras"):
        LoRAConfig(max_loras=0)
    with pytest.raises(ValueError, match="--max-cpu-loras"):
        LoRAConfig(max_loras=4, max_cpu_loras=2)
