"""EmbeddingEngine: batches concurrent embed calls and runs the encoder on a worker thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F

from weir_server.errors import EngineStepError, EngineUnavailableError, InvalidRequestError
from weir_server.models.loader import LoadedModel

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "last")
CPU_BATCH_TOKENS = 1024
GPU_BATCH_TOKENS = 16384
T = TypeVar("T")


@dataclass
class _EmbedCall:
    """One embed() call waiting for the worker."""

    token_ids: list[list[int]]
    pooling: str
    normalize: bool
    dimensions: int | None
    future: asyncio.Future[list[list[float]]] = field(repr=False)


class EmbeddingEngine:
    """Embeds token sequences with an encoder model; calls that arrive while a batch runs join the next one."""

    def __init__(self, loaded: LoadedModel, max_batch_tokens: int | None = None) -> None:
        if loaded.task != "embed":
            raise ValueError(f"{loaded.model_id} is a {loaded.task} model, not an embedding model")
        self.loaded = loaded
        self.model_id = loaded.model_id
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.hidden_size = int(loaded.hf_config.hidden_size)
        # A forward is the step a cancelled call cannot stop: on CPU a small one (a fraction of a second), so the
        # worker soon moves on; on a GPU big ones cost little time and use it well.
        on_cpu = torch.device(loaded.device).type == "cpu"
        self.max_batch_tokens = max_batch_tokens or (CPU_BATCH_TOKENS if on_cpu else GPU_BATCH_TOKENS)
        self._closing = False
        self._pad_id = int(getattr(loaded.hf_config, "pad_token_id", None) or 0)
        self._pending: list[_EmbedCall] = []
        self._worker: asyncio.Task[None] | None = None
        # One thread: the model is not re-entrant, and torch already uses every core inside a forward.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weir-embed")

    async def embed(
        self,
        token_ids: list[list[int]],
        pooling: str | None,
        normalize: bool,
        dimensions: int | None,
        *,
        input_field: str = "token_ids",
    ) -> list[list[float]]:
        """One vector per input; `input_field` names the request field in validation errors (e.g. "texts")."""
        pooling = pooling or self.loaded.pooling
        self._validate(token_ids, pooling, dimensions, input_field)
        call = _EmbedCall(token_ids, pooling, normalize, dimensions, asyncio.get_running_loop().create_future())
        self._pending.append(call)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="weir-embed-worker")
        return await call.future

    async def shutdown(self) -> None:
        """Fail the calls not done yet (EngineUnavailableError) once the running forward ends; release the thread."""
        self._closing = True
        closing = EngineUnavailableError("the server is shutting down")
        for call in self._pending:
            if not call.future.done():
                call.future.set_exception(closing)
        self._pending = []
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    def _validate(self, token_ids: list[list[int]], pooling: str, dimensions: int | None, input_field: str) -> None:
        if not token_ids:
            raise InvalidRequestError(input_field, "must contain at least one input")
        vocab_size = self.loaded.vocab_size
        for i, ids in enumerate(token_ids):
            if not ids:
                raise InvalidRequestError(f"{input_field}[{i}]", "must not be empty")
            if len(ids) > self.max_model_len:
                raise InvalidRequestError(
                    f"{input_field}[{i}]",
                    f"has {len(ids)} tokens, more than the model's maximum of {self.max_model_len}",
                )
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise InvalidRequestError(f"{input_field}[{i}]", f"token ids must be in [0, {vocab_size})")
        if pooling not in POOLING_MODES:
            raise InvalidRequestError("pooling", f"must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        if dimensions is not None and not 1 <= dimensions <= self.hidden_size:
            raise InvalidRequestError("dimensions", f"must be in [1, {self.hidden_size}], got {dimensions}")

    async def _drain(self) -> None:
        """Run everything pending as one batch, again and again until nothing is left."""
        loop = asyncio.get_running_loop()
        while self._pending:
            calls, self._pending = self._pending, []
            calls = [c for c in calls if not c.future.done()]  # the caller may have gone away
            if not calls:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, calls)
            except EngineUnavailableError as error:
                for call in calls:
                    if not call.future.done():
                        call.future.set_exception(error)
                continue
            except Exception as error:  # noqa: BLE001 - fail this batch's callers, keep serving
                logger.exception("Embedding batch of %d calls failed", len(calls))
                for call in calls:
                    if not call.future.done():
                        call.future.set_exception(EngineStepError(f"embedding failed: {error}"))
                continue
            for call, result in zip(calls, results, strict=True):
                if result is not None and not call.future.done():
                    call.future.set_result(result)

    def _run(self, calls: list[_EmbedCall]) -> list[list[list[float]] | None]:
        """Worker thread: embed every input of every call, longest-first batches bounded by max_batch_tokens.
        A call whose caller went away (its future is done) is skipped from the next batch on; its result is None."""
        inputs = [(c, i) for c, call in enumerate(calls) for i in range(len(call.token_ids))]
        inputs.sort(key=lambda ci: -len(calls[ci[0]].token_ids[ci[1]]))
        vectors: dict[tuple[int, int], torch.Tensor] = {}
        for batch in _batches(inputs, lambda ci: len(calls[ci[0]].token_ids[ci[1]]), self.max_batch_tokens):
            if self._closing:
                raise EngineUnavailableError("the server is shutting down")
            batch = [(c, i) for c, i in batch if not calls[c].future.done()]  # done() only reads a flag
            if not batch:
                continue
            sequences = [calls[c].token_ids[i] for c, i in batch]
            modes = [calls[c].pooling for c, _ in batch]
            for key, vector in zip(batch, self._embed_batch(sequences, modes), strict=True):
                vectors[key] = vector
        results: list[list[list[float]] | None] = []
        for c, call in enumerate(calls):
            if call.future.done():
                results.append(None)
                continue
            stacked = torch.stack([vectors[(c, i)] for i in range(len(call.token_ids))])
            if call.dimensions is not None:
                stacked = stacked[:, : call.dimensions]
            if call.normalize:
                stacked = F.normalize(stacked, p=2, dim=-1)
            results.append(stacked.tolist())
        return results

    def _embed_batch(self, sequences: list[list[int]], modes: list[str]) -> torch.Tensor:
        """[B, hidden] float32 pooled states for one padded batch."""
        device = self.loaded.device
        lengths = torch.tensor([len(s) for s in sequences], device=device)
        width = int(lengths.max())
        input_ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        input_ids = input_ids.to(device)
        mask = torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)
        model = self.loaded.model
        assert model is not None, "an embedding engine needs its model's weights"
        with torch.inference_mode():
            states = model(input_ids, mask.long(), torch.zeros_like(input_ids)).float()
            return pool(states, mask, lengths, modes).cpu()


def pool(states: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, modes: list[str]) -> torch.Tensor:
    """Pool token states [B, L, H] per row with that row's mode: mean over real tokens, first, or last."""
    rows = torch.arange(states.shape[0], device=states.device)
    by_mode = {
        "mean": lambda: (states * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(-1),
        "cls": lambda: states[:, 0],
        "last": lambda: states[rows, lengths - 1],
    }
    pooled = {mode: by_mode[mode]() for mode in set(modes)}
    return torch.stack([pooled[mode][row] for row, mode in enumerate(modes)])


def _batches(items: list[T], length_of: Callable[[T], int], max_tokens: int) -> list[list[T]]:
    """Consecutive groups (items sorted longest first) whose padded size rows x longest stays <= max_tokens."""
    groups: list[list[T]] = []
    for item in items:
        if groups and (len(groups[-1]) + 1) * length_of(groups[-1][0]) <= max_tokens:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups
