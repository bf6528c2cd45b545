"""The EngineCore in a process of its own: load the model, then step it, taking messages from the server's pipe.

Why a process: on a GPU the engine's host work (schedule, prepare, sample, detokenize) and the gRPC event
loop's per-message work both need the one GIL of a process. Measured on an H100 at 512 streams (bench/RESULTS.md),
the engine thread alone stepped at 42-49k tokens/s while gRPC beside it on the same GIL reached 17-20k. In its own
process the core steps at its own pace and the server process merges the outputs of streams that fall behind into
fewer, larger messages. On a 2-core CPU too it measured 1.0-1.9x a thread's tokens/s at 8 and 32 streams, so a
server's `--engine-core auto` takes a process there as well unless an embedding model shares the server process
(`factory.server_engine_config`). The server's side of the pipe is `core_client.ProcessClient`; the core loads the
model and describes it to the server (`ModelDescription`), so the server process never imports torch.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from weir_server.config import EngineConfig
from weir_server.engine.kv_events import KvEvent
from weir_server.engine.stats import EngineStats
from weir_server.engine.types import GenerationOutput
from weir_server.engine.wire import (
    AbortRequest,
    AdapterReply,
    AddRequest,
    CallError,
    CoreFailed,
    CoreInfo,
    CoreOutputs,
    CoreReady,
    LoadAdapter,
    ModelDescription,
    StopCore,
    UnloadAdapter,
    encode_kv_events,
    encode_outputs,
)
from weir_server.errors import WeirError
from weir_server.process_lifetime import (
    exit_with_parent,
    freeze_startup_objects,
    keep_unusable_triton_out,
    large_allocations_mapped,
)

if TYPE_CHECKING:
    from weir_server.engine.core import CoreLoop

logger = logging.getLogger(__name__)

Step = tuple[list[GenerationOutput], EngineStats, list[KvEvent]]  # one core iteration's outputs, stats and events
Outgoing = Step | AdapterReply | None  # None: stop sending


def run_core_process(config: EngineConfig, conn: Connection, log_level: int) -> None:
    """The core process's main: build the core, then step it until told to stop or the server process is gone."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine core] %(name)s: %(message)s")
    exit_with_parent()
    keep_unusable_triton_out()
    # Here, not at the top: the server process imports this module (to name this function) and never the core.
    from weir_server.engine.core import CoreLoop, EngineCore

    try:
        with large_allocations_mapped():
            core = EngineCore.from_config(config, detokenize_all=False)  # the server process makes most text
    except Exception as error:  # noqa: BLE001 - the server reports a failed start in one line, as for a thread core
        logger.debug("engine core failed to start", exc_info=True)
        message = str(error) if isinstance(error, WeirError) else f"{type(error).__name__}: {error}"
        conn.send(CoreFailed(" ".join(message.split())))
        os._exit(1)
    # Outputs leave through a sender thread: pickling and a pipe write that blocks while the server is busy
    # must not hold up the next step. The sender pickles while the loop waits for the GPU (GIL released).
    # Steps that pile up while the server reads go out as one message.
    outbox: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
    loop = CoreLoop(core, lambda outputs, stats, events: outbox.put((outputs, stats, events)))
    freeze_startup_objects()
    model = ModelDescription.of(core.loaded)
    conn.send(CoreReady(CoreInfo(core.max_seq_len, core.stats(), tuple(core.adapters()), model)))
    sender = threading.Thread(target=_send, args=(conn, outbox), name="weir-core-send", daemon=True)
    sender.start()
    threading.Thread(target=_receive, args=(conn, loop, outbox), name="weir-core-receive", daemon=True).start()
    loop.run()
    outbox.put(None)
    sender.join(timeout=5)
    logging.shutdown()
    os._exit(0)  # teardown of CUDA graphs and helper threads can stall; nothing here needs it


def _send(conn: Connection, outbox: queue.SimpleQueue[Outgoing]) -> None:
    """Sender thread: each step's outputs to the server, those of steps queued meanwhile merged into one message;
    adapter replies in their place among them."""
    done = False
    try:
        while not done:
            items = [outbox.get()]
            while not outbox.empty():
                items.append(outbox.get_nowait())
            merged: Step | None = None
            for item in items:
                if item is None:
                    done = True
                    break
                if isinstance(item, AdapterReply):
                    _send_step(conn, merged)
                    merged = None
                    conn.send(item)
                elif merged is None:
                    merged = item
                else:
                    merged = (merged[0] + item[0], item[1], merged[2] + item[2])
            _send_step(conn, merged)
    except (OSError, ValueError):  # the server is gone; the parent watch ends this process
        pass


def _send_step(conn: Connection, step: Step | None) -> None:
    if step is not None:
        outputs, stats, events = step
        conn.send(CoreOutputs(encode_outputs(outputs), stats, encode_kv_events(events)))


def _load_adapter(loop: CoreLoop, outbox: queue.SimpleQueue[Outgoing], message: LoadAdapter) -> None:
    """Read an adapter off the loop's thread, then register it on it; the reply goes out with the outputs."""
    try:
        adapter = loop.core.read_adapter(message.name, message.path)
        reply = AdapterReply(message.call_id, info=loop.call(lambda core: core.add_adapter(adapter)).result())
    except WeirError as error:
        reply = AdapterReply(message.call_id, error=CallError.of(error))
    except Exception as error:  # unexpected: the caller gets it as an error, the core goes on
        logger.exception("loading adapter %r failed", message.name)
        reply = AdapterReply(message.call_id, error=CallError("other", "", f"{type(error).__name__}: {error}"))
    outbox.put(reply)


def _unload_adapter(loop: CoreLoop, outbox: queue.SimpleQueue[Outgoing], message: UnloadAdapter) -> None:
    def done(future: Future[None]) -> None:
        error = future.exception()
        if error is None:
            outbox.put(AdapterReply(message.call_id))
        elif isinstance(error, WeirError):
            outbox.put(AdapterReply(message.call_id, error=CallError.of(error)))
        else:
            outbox.put(AdapterReply(message.call_id, error=CallError("other", "", f"{type(error).__name__}: {error}")))

    loop.call(lambda core: core.remove_adapter(message.name)).add_done_callback(done)


def _receive(conn: Connection, loop: CoreLoop, outbox: queue.SimpleQueue[Outgoing]) -> None:
    """Receiver thread: the server's messages into the loop, until it says stop or is gone."""
    try:
        while True:
            match conn.recv():
                case AddRequest(request):
                    loop.add(request, check_capacity=False)  # the server counts what it admits
                case AbortRequest(request_id):
                    loop.abort(request_id)
                case LoadAdapter() as load:
                    threading.Thread(target=_load_adapter, args=(loop, outbox, load), daemon=True).start()
                case UnloadAdapter() as unload:
                    _unload_adapter(loop, outbox, unload)
                case StopCore():
                    break
                case other:
                    logger.error("unexpected message from the server: %r", other)
    except (EOFError, OSError):
        pass
    loop.stop()
