"""The one place the harnesses build Weir's engine objects directly, bypassing gRPC.

Most rows go through a `weir serve` subprocess; the in-process rows, the engine-loop row, the greedy check and
the host profile need the engine itself. Keeping its construction here means a rename in weir_server.engine is a
one-line change for every `weir bench` subcommand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def engine_core(loaded: Any, config: Any, detokenize_all: bool = True) -> Any:
    """The synchronous engine core (schedule, launch, read back, outputs) over a loaded model, no loop, no thread.
    `detokenize_all=False`: it makes only the text of choices with stop strings, as in a core process."""
    from weir_server.engine.core import EngineCore

    return EngineCore(loaded, config, detokenize_all=detokenize_all)


def async_engine(loaded: Any, config: Any) -> Any:
    """The asyncio front end with the core stepping on a thread of this process (started by `await .start()`)."""
    from weir_server.engine.core import EngineCore
    from weir_server.engine.factory import thread_engine

    return thread_engine(EngineCore(loaded, config))


def core_of(engine: Any) -> Any:
    """The engine core an `async_engine` steps; usable synchronously once that engine is shut down."""
    return engine.client.core


def run_to_completion(
    core: Any, requests: list[Any], on_output: Callable[[Any], None] | None = None
) -> dict[str, list[int]]:
    """Validate and add `requests` (GenerationRequest), step until all finish; the token ids of each request.
    `on_output` sees every GenerationOutput as it comes."""
    for request in requests:
        core.add_request(core.validate(request))
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
            if on_output is not None:
                on_output(out)
    return tokens
