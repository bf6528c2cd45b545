"""Child processes of the server (engine core, tensor-parallel workers) end when the server does."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from multiprocessing.connection import wait


def exit_with_parent() -> None:
    """In a multiprocessing child: exit at once when the parent process is gone, whatever this one is doing."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="weir-parent-watch", daemon=True).start()
