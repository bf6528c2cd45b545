"""AsyncWeirClient: the asyncio twin of WeirClient, over grpc.aio. Every failure raises WeirClientError."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar, Unpack

import grpc

from weir_client import _protocol as proto
from weir_client._base import UNSET, BaseClient, ReadinessPoll, UnaryCall
from weir_client.control import KvEventBatch, ServerInfo, ServerLoad, kv_event_batch
from weir_client.errors import WeirClientError, error_from_rpc
from weir_client.types import (
    AdapterInfo,
    Completion,
    CompletionBuilder,
    Embeddings,
    GenerateKeywords,
    GenerationChunk,
    ModelInfo,
    Tokenization,
)

T = TypeVar("T")


class AsyncWeirClient(BaseClient):
    """Asyncio client with the same arguments, methods and defaults as WeirClient; `async with` closes the channel."""

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        return self._channel

    async def __aenter__(self) -> AsyncWeirClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate(
        self, prompt: str | None = None, **keywords: Unpack[GenerateKeywords]
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of one input as chunks (`async for`); closing the iterator early cancels it.
        Takes the same messages, sampling, tool and constraint keywords as WeirClient.generate()."""
        return _chunks(self._start_generate(prompt, keywords))

    async def complete(self, prompt: str | None = None, **keywords: Unpack[GenerateKeywords]) -> Completion:
        """Like generate(), but wait for the end and return the whole Completion."""
        builder = CompletionBuilder()
        async for chunk in self.generate(prompt, **keywords):
            builder.add(chunk)
        return builder.build()

    async def embed(
        self,
        texts: str | Sequence[str] | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        model: str = "",
        pooling: str | None = None,
        normalize: bool = True,
        dimensions: int | None = None,
        truncate: bool = False,
        timeout: float | None = UNSET,
    ) -> Embeddings:
        """One vector per text (or token id sequence); `pooling` is None (model default), mean, cls or last."""
        call = self._embed_call(texts, token_ids, model, pooling, normalize, dimensions, truncate)
        return await self._unary(call, timeout)

    async def tokenize(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        add_special_tokens: bool = True,
        return_offsets: bool = False,
        timeout: float | None = UNSET,
    ) -> list[Tokenization]:
        """Tokenize each text with the model's tokenizer (default: the generation model's)."""
        return await self._unary(self._tokenize_call(texts, model, add_special_tokens, return_offsets), timeout)

    async def detokenize(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        model: str = "",
        skip_special_tokens: bool = True,
        timeout: float | None = UNSET,
    ) -> list[str]:
        """The text of each token id sequence."""
        return await self._unary(self._detokenize_call(sequences, model, skip_special_tokens), timeout)

    async def list_models(self, *, timeout: float | None = UNSET) -> list[ModelInfo]:
        """The models the server has loaded."""
        return await self._unary(self._list_models_call(), timeout)

    async def load_adapter(
        self, name: str, path: str, model: str = "", *, timeout: float | None = UNSET
    ) -> AdapterInfo:
        """Load the LoRA adapter in the server's folder `path` as `name` onto `model` ("" = the default generation
        model); the server must run with --enable-lora."""
        return await self._unary(self._load_adapter_call(name, path, model), timeout)

    async def unload_adapter(self, name: str, *, timeout: float | None = UNSET) -> None:
        """Unload the LoRA adapter `name`; requests using it finish first."""
        await self._unary(self._unload_adapter_call(name), timeout)

    async def list_adapters(self, model: str = "", *, timeout: float | None = UNSET) -> list[AdapterInfo]:
        """The LoRA adapters loaded on `model` ("" = on every generation model)."""
        return await self._unary(self._list_adapters_call(model), timeout)

    async def abort(self, request_ids: str | Sequence[str], *, timeout: float | None = UNSET) -> list[str]:
        """Cancel requests by the ids their Generate calls carry (their streams end with CANCELLED); returns the
        ids that were still running. Unknown or finished ids are not an error."""
        return await self._unary(self._abort_call(request_ids), timeout)

    async def get_load(self, model: str = "", *, timeout: float | None = UNSET) -> ServerLoad:
        """Each generation model's running and waiting requests, KV blocks and recent rates (ControlService)."""
        return await self._unary(self._get_load_call(model), timeout)

    async def server_info(self, *, timeout: float | None = UNSET) -> ServerInfo:
        """The server's version and how each model is served, with its tokenizer's digest."""
        return await self._unary(self._server_info_call(), timeout)

    async def watch_kv_events(self, model: str = "", *, timeout: float | None = None) -> AsyncIterator[KvEventBatch]:
        """Stream a generation model's prefix-cache events: a snapshot first, then one batch per step that changed
        the cache. Runs until closed (or `timeout`); a subscriber that falls behind gets RESOURCE_EXHAUSTED."""
        call = self._start_watch_kv_events(model, timeout)
        try:
            async for message in call:
                yield kv_event_batch(message)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()

    async def health(self, service: str = "", *, timeout: float | None = UNSET) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN."""
        return await self._unary(self._health_call(service), timeout)

    async def wait_until_ready(self, timeout: float = 300.0, interval: float = 0.25) -> None:
        """Wait until health is SERVING; raise WeirClientError(DEADLINE_EXCEEDED) after `timeout` seconds."""
        poll = ReadinessPoll(self.target, timeout)
        for probe_timeout in poll.probes():
            try:
                status: str | WeirClientError = await self.health(timeout=probe_timeout)
            except WeirClientError as e:
                status = e
            if poll.serving(status):
                return
            await asyncio.sleep(interval)
        raise poll.expired()

    async def _unary(self, call: UnaryCall[T], timeout: float | None) -> T:
        try:
            reply = await call.method(call.request, timeout=self._deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return call.read(reply)


async def _chunks(call: Any) -> AsyncIterator[GenerationChunk]:
    try:
        async for message in call:
            yield proto.generation_chunk(message)
    except grpc.RpcError as e:
        raise error_from_rpc(e) from None
    finally:
        call.cancel()  # a no-op once the stream has ended
