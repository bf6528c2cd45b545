"""One parse of a GGUF file per model load.

Loading a GGUF model opens the file five times: Weir's checks twice, and transformers once each for the config,
the tokenizer and the weights (each `from gguf import GGUFReader` inside its own function). Every open parses the
whole metadata, and a 49k-token vocabulary makes that seconds each time; transformers also rebuilds gguf's
tensor-name map for each of several hundred tensor lookups. While `shared_gguf_readers()` is active, a GGUFReader of
a file that is already open is that same (read-only, memory-mapped) reader, and the name maps are built once.

The shared reader's arrays are plain ndarray views of the file's map: every view of an `np.memmap` is a memmap
too, with a dict of its own, and the metadata of a 49k-token vocabulary is some 200k of them (SmolLM2's reader
held 157 MiB as memmap views, 70 MiB as plain views, and parsed in 0.6 s instead of 2.0).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

_lock = threading.Lock()
_active = 0  # loads inside the context now: the first patches gguf, the last restores it
_readers: dict[tuple[str, int, int], Any] = {}
_saved: tuple[Any, Any] | None = None


def _plain_view_reader_class(real: Any) -> Any:
    class PlainViewGGUFReader(real):  # type: ignore[misc, valid-type]
        """A GGUFReader whose fields and tensors are plain ndarray views of a read-only memory map of the file."""

        def __init__(self, path: Any, mode: str = "r") -> None:
            with open(path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            super().__init__(path, mode)

        @property
        def data(self) -> np.ndarray:
            return self._plain_data  # type: ignore[no-any-return]

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = np.frombuffer(self._map, dtype=np.uint8)  # in place of gguf's memmap of the file

        def drop_pages(self) -> None:
            """Take the file's pages read so far out of this process's memory (a later read faults them back in
            from the page cache): the tensors copied out of them would otherwise count twice at the load's peak."""
            self._map.madvise(mmap.MADV_DONTNEED)

    return PlainViewGGUFReader


def _shared_reader_class(real: Any) -> Any:
    plain = _plain_view_reader_class(real)

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
                reader = plain(path, mode)  # not an instance of this class, so __init__ does not run again
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
