"""WeirClient: a blocking client for weir.v1.InferenceService. Every failure raises WeirClientError."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, Unpack

import grpc

from weir_client import _protocol as proto
from weir_client._base import UNSET, BaseClient, ReadinessPoll, UnaryCall
from weir_client.control import KvEventBatch, ServerInfo, ServerLoad, kv_event_batch
from weir_client.errors import WeirClientError, error_from_rpc
from weir_client.types import (
    AdapterInfo,
    Completion,
    Embeddings,
    GenerateKeywords,
    GenerationChunk,
    ModelInfo,
    Tokenization,
    collect,
)

T = TypeVar("T")


class WeirClient(BaseClient):
    """Blocking client. `timeout` (seconds) is the default deadline of every call; each method takes its own.

    Idempotent calls (embed, tokenize, detokenize, list_models, health) are retried on UNAVAILABLE up to
    `max_attempts` times by gRPC itself; generate is never retried. Use as a context manager to close the channel.
    `load_balancing="round_robin"` with a multi-address target (`dns:///svc:50051`, `ipv4:a:p,b:p`) spreads calls
    over the healthy servers. `tls=True` (system roots) or `tls=TlsOptions(ca_file=..., cert_file=..., key_file=...)`
    connects over TLS / mutual TLS; `api_key` is sent as `authorization: Bearer KEY` to servers run with `--api-key`.
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        return self._channel

    def __enter__(self) -> WeirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | None = None, **keywords: Unpack[GenerateKeywords]) -> Iterator[GenerationChunk]:
        """Stream the completion of one input (a prompt, chat `messages` or `token_ids`) as chunks.

        `messages` and the keywords take OpenAI's shapes: sampling (SamplingOptions, with `logit_bias`), then
        `tools`, `tool_choice`, `chat_template_kwargs` and at most one constraint of `json_schema`, `json_object`,
        `regex`, `choice`, `grammar` (OutputOptions). Leaving the loop early cancels the request on the server.
        """
        return _chunks(self._start_generate(prompt, keywords))

    def complete(self, prompt: str | None = None, **keywords: Unpack[GenerateKeywords]) -> Completion:
        """Like generate(), but wait for the end and return the whole Completion."""
        return collect(self.generate(prompt, **keywords))

    def embed(
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
        return self._unary(self._embed_call(texts, token_ids, model, pooling, normalize, dimensions, truncate), timeout)

    def tokenize(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        add_special_tokens: bool = True,
        return_offsets: bool = False,
        timeout: float | None = UNSET,
    ) -> list[Tokenization]:
        """Tokenize each text with the model's tokenizer (default: the generation model's)."""
        return self._unary(self._tokenize_call(texts, model, add_special_tokens, return_offsets), timeout)

    def detokenize(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        model: str = "",
        skip_special_tokens: bool = True,
        timeout: float | None = UNSET,
    ) -> list[str]:
        """The text of each token id sequence."""
        return self._unary(self._detokenize_call(sequences, model, skip_special_tokens), timeout)

    def list_models(self, *, timeout: float | None = UNSET) -> list[ModelInfo]:
        """The models the server has loaded."""
        return self._unary(self._list_models_call(), timeout)

    def load_adapter(self, name: str, path: str, model: str = "", *, timeout: float | None = UNSET) -> AdapterInfo:
        """Load the LoRA adapter in the server's folder `path` as `name` onto `model` ("" = the default generation
        model); the server must run with --enable-lora."""
        return self._unary(self._load_adapter_call(name, path, model), timeout)

    def unload_adapter(self, name: str, *, timeout: float | None = UNSET) -> None:
        """Unload the LoRA adapter `name`; requests using it finish first."""
        self._unary(self._unload_adapter_call(name), timeout)

    def list_adapters(self, model: str = "", *, timeout: float | None = UNSET) -> list[AdapterInfo]:
        """The LoRA adapters loaded on `model` ("" = on every generation model)."""
        return self._unary(self._list_adapters_call(model), timeout)

    def abort(self, request_ids: str | Sequence[str], *, timeout: float | None = UNSET) -> list[str]:
        """Cancel requests by the ids their Generate calls carry (their streams end with CANCELLED); returns the
        ids that were still running. Unknown or finished ids are not an error."""
        return self._unary(self._abort_call(request_ids), timeout)

    def get_load(self, model: str = "", *, timeout: float | None = UNSET) -> ServerLoad:
        """Each generation model's running and waiting requests, KV blocks and recent rates (ControlService)."""
        return self._unary(self._get_load_call(model), timeout)

    def server_info(self, *, timeout: float | None = UNSET) -> ServerInfo:
        """The server's version and how each model is served, with its tokenizer's digest."""
        return self._unary(self._server_info_call(), timeout)

    def watch_kv_events(self, model: str = "", *, timeout: float | None = None) -> Iterator[KvEventBatch]:
        """Stream a generation model's prefix-cache events: a snapshot first, then one batch per step that changed
        the cache. Runs until closed (or `timeout`); a subscriber that falls behind gets RESOURCE_EXHAUSTED."""
        call = self._start_watch_kv_events(model, timeout)
        try:
            for message in call:
                yield kv_event_batch(message)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()

    def health(self, service: str = "", *, timeout: float | None = UNSET) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN."""
        return self._unary(self._health_call(service), timeout)

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 0.25) -> None:
        """Block until health is SERVING; raise WeirClientError(DEADLINE_EXCEEDED) after `timeout` seconds."""
        poll = ReadinessPoll(self.target, timeout)
        for probe_timeout in poll.probes():
            try:
                status: str | WeirClientError = self.health(timeout=probe_timeout)
            except WeirClientError as e:
                status = e
            if poll.serving(status):
                return
            time.sleep(interval)
        raise poll.expired()

    def _unary(self, call: UnaryCall[T], timeout: float | None) -> T:
        try:
            reply = call.method(call.request, timeout=self._deadline(timeout), metadata=self.metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return call.read(reply)


def _chunks(call: Any) -> Iterator[GenerationChunk]:
    try:
        for message in call:
            yield proto.generation_chunk(message)
    except grpc.RpcError as e:
        raise error_from_rpc(e) from None
    finally:
        call.cancel()  # a no-op once the stream has ended
