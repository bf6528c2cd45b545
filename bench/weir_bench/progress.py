"""Progress of one load point: a tqdm bar when stderr is a terminal, else an occasional log line."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any, TextIO

from weir_bench.load import RequestTiming

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # without a terminal: at most one line this often (and one at the end)


class Progress:
    """Counts finished requests of one point; use as a context manager and pass `update` as `on_done`."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.errors = 0
        self._stream = stream or sys.stderr
        self._bar: Any = None
        self._enabled = enabled
        self._last_log = time.monotonic()

    def __enter__(self) -> Progress:
        if self._enabled and self._stream.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type stubs

            self._bar = tqdm(total=self.total, desc=self.label, unit="req", file=self._stream, leave=False)
        return self

    def update(self, timing: RequestTiming) -> None:
        self.done += 1
        self.errors += 0 if timing.ok else 1
        if self._bar is not None:
            self._bar.update(1)
            if self.errors:
                self._bar.set_postfix(errors=self.errors, refresh=False)
        elif self._enabled and time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            logger.info("%s: %d/%d requests done (%d failed)", self.label, self.done, self.total, self.errors)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
