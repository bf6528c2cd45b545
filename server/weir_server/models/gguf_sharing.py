"""One parse of a GGUF file per model load.

Loading a GGUF model opens the file five times: Weir's checks twice, and transformers once each for the config,
the tokenizer and the weights (each `from gguf import GGUFReader` inside its own function). Every open parses the
whole metadata, and a 49k-token vocabulary makes that seconds each time; transformers also rebuilds gguf's
tensor-name map for each of several hundred tensor lookups. While `shared_gguf_readers()` is active, a GGUFReader of
a file that is already open is that same (read-only, memory-mapped) reader, and the name maps are built once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_active = 0  # loads inside the context now: the first patches gguf, the last restores it
_readers: dict[tuple[str, int, int], Any] = {}
_saved: tuple[Any, Any] | None = None


def _shared_reader_class(real: Any) -> Any:
    class SharedGGUFReader(real):  # type: ignore[misc, valid-type]
        """GGUFReader(path) answered from the readers open in this load; subclasses (a reader of the tensor table
        only) and writable opens are made as usual."""

        def __new__(cls, path: Any, mode: str = "r") -> Any:
            if cls is not SharedGGUFReader or mode != "r":
                return super().__new__(cls)
            stat = os.stat(path)
            key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
            with _lock:
                reader = _readers.get(key)
            if reader is None:
                reader = real(path, mode)  # not an instance of this class, so __init__ does not run again
                with _lock:
                    _readers[key] = reader
            return reader

    return SharedGGUFReader


@contextlib.contextmanager
def shared_gguf_readers() -> Iterator[None]:
    """Within this context (re-entrant, any thread) every open of one GGUF file is one parse."""
    global _active, _saved
    import gguf

    with _lock:
        if _active == 0:
            _saved = (gguf.GGUFReader, gguf.get_tensor_name_map)
            gguf.GGUFReader = _shared_reader_class(_saved[0])  # type: ignore[misc]
            gguf.get_tensor_name_map = functools.cache(_saved[1])
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _saved is not None:
                gguf.GGUFReader, gguf.get_tensor_name_map = _saved  # type: ignore[misc]
                _saved = None
                _readers.clear()
