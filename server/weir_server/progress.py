"""Progress of slow start-up work (weight shards, GGUF tensors, CUDA-graph capture): a bar on a terminal, a log line
every few seconds otherwise, so a log file gets readable lines instead of carriage returns."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LOG_INTERVAL_S = 5.0  # without a terminal: at most one line per this many seconds, and one at the end

logger = logging.getLogger("weir_server.progress")


def on_terminal() -> bool:
    """Whether progress bars can be drawn: stderr is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", interval_s: float = LOG_INTERVAL_S
) -> Iterator[T]:
    """Yield `items`, showing how far along they are: a tqdm bar on a terminal, else periodic log lines."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]  # Sized, checked just above
    if on_terminal():
        from tqdm import tqdm  # a dependency of huggingface-hub, so always present beside transformers

        yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        return
    yield from _logged(items, desc, total, unit, interval_s)


def _logged(items: Iterable[T], desc: str, total: int | None, unit: str, interval_s: float) -> Iterator[T]:
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval_s:
            last = now
            logger.info("%s: %s", desc, _count(done, total, unit))
    if done and last != started:  # a line was logged along the way: say that it finished too
        logger.info("%s: %s in %.1fs", desc, _count(done, total, unit), time.monotonic() - started)


def _count(done: int, total: int | None, unit: str) -> str:
    if total:
        return f"{done}/{total} {unit} ({100 * done / total:.0f}%)"
    return f"{done} {unit}"
