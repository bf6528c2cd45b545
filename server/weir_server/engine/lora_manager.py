"""The LoRA adapters an engine serves: held in host memory by name, `max_loras` of them in device slots at once.

A running sequence of an adapter pins its adapter's slot; a slot no running sequence pins can be given to another
adapter, least recently used first. A sequence whose adapter has no slot and finds none free waits (the scheduler
leaves it queued) until one frees. An unloaded adapter is forgotten by name at once, and its slot and memory go
once its last sequence has ended (`collect`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from weir_server.config import LoRAConfig
from weir_server.engine.types import AdapterInfo
from weir_server.errors import InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from weir_server.executor.lora_checkpoint import LoRAWeights  # torch: the server process only names adapters

NO_SLOT = -1  # a sequence of the base model, or of an adapter not in a slot yet
MAX_NAME_CHARS = 256


def check_adapter_name(name: str, base_model_id: str) -> None:
    """Raise InvalidRequestError unless `name` can name an adapter: non-empty, no surrounding spaces, not the base
    model's own id."""
    if not name or name != name.strip() or len(name) > MAX_NAME_CHARS:
        raise InvalidRequestError(
            "name", f"an adapter name must be 1-{MAX_NAME_CHARS} characters without surrounding spaces, got {name!r}"
        )
    if name == base_model_id:
        raise InvalidRequestError("name", f"{name!r} is the base model's name")


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter in host memory. `cache_salt` keys its prefix-cache blocks apart from the base model's and every
    other adapter's (a digest of its files, so equal adapters share blocks, and every server agrees)."""

    info: AdapterInfo
    weights: LoRAWeights
    cache_salt: int
    slot: int = NO_SLOT
    num_running: int = 0  # sequences holding its slot
    unloaded: bool = False
    sequences: set[int] = field(default_factory=set)  # seq ids queued or running with it


LoadSlot = Callable[[int, "LoRAWeights"], None]  # copy an adapter's weights into a device slot


class LoRAManager:
    """Adapters by name, and which one each device slot holds; never touches tensors itself (`load_slot` does)."""

    def __init__(self, config: LoRAConfig, load_slot: LoadSlot) -> None:
        self.config = config
        self.max_loras = config.max_loras
        self._load_slot = load_slot
        self.adapters: dict[str, LoadedAdapter] = {}
        self.slots: list[LoadedAdapter | None] = [None] * config.max_loras
        self._idle_slots: OrderedDict[int, None] = OrderedDict((i, None) for i in range(config.max_loras))
        self._unloading: list[LoadedAdapter] = []

    def add(self, adapter: LoadedAdapter) -> None:
        """Serve a loaded adapter under its name; raises InvalidRequestError for a taken name or a full host."""
        name = adapter.info.name
        if name in self.adapters:
            raise InvalidRequestError("name", f"an adapter named {name!r} is already loaded")
        limit = self.config.max_cpu_loras
        if limit is not None and len(self.adapters) >= limit:
            raise InvalidRequestError("name", f"{limit} adapters are loaded (--max-cpu-loras); unload one first")
        self.adapters[name] = adapter

    def get(self, name: str) -> LoadedAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise NotFoundError(f"adapter {name!r} is not loaded")
        return adapter

    def remove(self, name: str) -> None:
        """Stop serving `name`: unknown from now on; its memory goes once its sequences have ended."""
        adapter = self.get(name)
        del self.adapters[name]
        adapter.unloaded = True
        self._unloading.append(adapter)
        self.collect()

    def infos(self) -> list[AdapterInfo]:
        return [adapter.info for adapter in self.adapters.values()]

    # ---- slots ------------------------------------------------------------------------------------------

    def can_acquire(self, adapter: LoadedAdapter) -> bool:
        """Whether a sequence of `adapter` can run now: its adapter holds a slot, or a slot is idle."""
        return adapter.slot != NO_SLOT or bool(self._idle_slots)

    def acquire(self, adapter: LoadedAdapter) -> int:
        """Pin the adapter's slot for one more running sequence, loading it into the least recently used idle
        slot first if needed; returns the slot."""
        if adapter.slot == NO_SLOT:
            slot, _ = self._idle_slots.popitem(last=False)
            previous = self.slots[slot]
            if previous is not None:
                previous.slot = NO_SLOT
            self._load_slot(slot, adapter.weights)
            self.slots[slot], adapter.slot = adapter, slot
        elif adapter.num_running == 0:
            del self._idle_slots[adapter.slot]
        adapter.num_running += 1
        return adapter.slot

    def release(self, adapter: LoadedAdapter) -> None:
        """One running sequence of `adapter` left the device (finished, aborted or preempted)."""
        adapter.num_running -= 1
        assert adapter.num_running >= 0, f"adapter {adapter.info.name!r} released more often than acquired"
        if adapter.num_running == 0:
            self._idle_slots[adapter.slot] = None  # most recently used: evicted last

    # ---- unloading --------------------------------------------------------------------------------------

    def collect(self) -> None:
        """Free the unloaded adapters none of whose sequences is left."""
        if not self._unloading:
            return
        done = [a for a in self._unloading if not a.sequences]
        for adapter in done:
            self._unloading.remove(adapter)
            if adapter.slot != NO_SLOT:
                self.slots[adapter.slot] = None
                self._idle_slots[adapter.slot] = None
                self._idle_slots.move_to_end(adapter.slot, last=False)  # empty: handed out first
                adapter.slot = NO_SLOT

    @property
    def num_unloading(self) -> int:
        return len(self._unloading)

    def counts(self, names: Iterable[str]) -> tuple[tuple[str, int], ...]:
        """(name, count) pairs of the names given, one per distinct name, in first-seen order."""
        seen: dict[str, int] = {}
        for name in names:
            seen[name] = seen.get(name, 0) + 1
        return tuple(seen.items())
