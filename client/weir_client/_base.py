"""What WeirClient and AsyncWeirClient share: the channel's settings, every call's request and how its reply is
read. The two clients are thin shells that make the calls, blocking or awaited, and map their errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_client import _protocol as proto
from weir_client import control
from weir_client.errors import WeirClientError
from weir_client.security import TlsOptions, channel_security, with_auth
from weir_client.types import AdapterInfo, Embeddings, GenerateKeywords, GenerateOptions, ModelInfo, Tokenization

T = TypeVar("T")
UNSET: Any = object()  # a method's `timeout` when not given: the client's default deadline applies (None: none)
# generate()'s keywords that say what to run and where (the input, model, id, deadline), not how to sample.
_ROUTING = frozenset(GenerateKeywords.__annotations__) - frozenset(GenerateOptions.__annotations__)


@dataclass(frozen=True)
class UnaryCall(Generic[T]):
    """One unary call to make: the stub's method, its request, and how the reply becomes the result."""

    method: Callable[..., Any]
    request: Any
    read: Callable[[Any], T]


class BaseClient:
    """Settings and request building of both clients (see WeirClient for the arguments); a shell supplies
    `_open_channel` (blocking or asyncio) and makes the calls."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_attempts: int = 4,
        load_balancing: str | None = None,
        tls: TlsOptions | bool | None = None,
        api_key: str | None = None,
    ) -> None:
        credentials, tls_options = channel_security(tls, credentials)
        channel = self._open_channel(
            target, credentials, proto.channel_options(max_attempts, load_balancing) + tls_options
        )
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._control = inference_pb2_grpc.ControlServiceStub(channel)
        self._health: Any = health_pb2_grpc.HealthStub(channel)  # typeshed's HealthStub declares no methods
        self.target = target
        self.timeout = timeout
        self.metadata = with_auth(metadata, api_key)

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        raise NotImplementedError

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is UNSET else timeout

    def _start_generate(self, prompt: str | None, keywords: GenerateKeywords) -> Any:
        """Start the Generate stream (blocking or asyncio, as the channel is) for generate()'s arguments."""
        options = cast(GenerateOptions, {k: v for k, v in keywords.items() if k not in _ROUTING})
        request = proto.generate_request(
            prompt,
            keywords.get("messages"),
            keywords.get("token_ids"),
            keywords.get("model", ""),
            keywords.get("request_id", ""),
            keywords.get("add_generation_prompt", True),
            options,
        )
        request.adapter = keywords.get("adapter", "")
        timeout = self._deadline(keywords.get("timeout", UNSET))
        return self._stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def _embed_call(
        self,
        texts: str | Sequence[str] | None,
        token_ids: Sequence[Sequence[int]] | None,
        model: str,
        pooling: str | None,
        normalize: bool,
        dimensions: int | None,
        truncate: bool,
    ) -> UnaryCall[Embeddings]:
        if pooling not in proto.POOLINGS:
            raise WeirClientError.invalid_argument("pooling", f"must be one of mean, cls, last; got {pooling!r}")
        if dimensions is not None and dimensions < 0:
            raise WeirClientError.invalid_argument("dimensions", f"must be >= 0, got {dimensions}")
        request = pb.EmbedRequest(
            model=model,
            texts=proto.texts_list(texts) if texts is not None else [],
            token_ids=proto.token_ids_messages(token_ids or ()),
            pooling=proto.POOLINGS[pooling],
            normalize=normalize,
            dimensions=dimensions or 0,
            truncate=truncate,
        )
        return UnaryCall(self._stub.Embed, request, proto.embeddings)

    def _tokenize_call(
        self, texts: str | Sequence[str], model: str, add_special_tokens: bool, return_offsets: bool
    ) -> UnaryCall[list[Tokenization]]:
        request = pb.TokenizeRequest(
            model=model,
            texts=proto.texts_list(texts),
            add_special_tokens=add_special_tokens,
            return_offsets=return_offsets,
        )
        return UnaryCall(self._stub.Tokenize, request, lambda reply: proto.tokenizations(reply, return_offsets))

    def _detokenize_call(
        self, sequences: Sequence[Sequence[int]], model: str, skip_special_tokens: bool
    ) -> UnaryCall[list[str]]:
        request = pb.DetokenizeRequest(
            model=model, sequences=proto.token_ids_messages(sequences), skip_special_tokens=skip_special_tokens
        )
        return UnaryCall(self._stub.Detokenize, request, lambda reply: list(reply.texts))

    def _list_models_call(self) -> UnaryCall[list[ModelInfo]]:
        return UnaryCall(
            self._stub.ListModels, pb.ListModelsRequest(), lambda reply: [proto.model_info(m) for m in reply.models]
        )

    def _load_adapter_call(self, name: str, path: str, model: str) -> UnaryCall[AdapterInfo]:
        request = pb.LoadAdapterRequest(name=name, path=path, model=model)
        return UnaryCall(self._stub.LoadAdapter, request, lambda reply: proto.adapter_info(reply.adapter))

    def _unload_adapter_call(self, name: str) -> UnaryCall[None]:
        return UnaryCall(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), lambda reply: None)

    def _list_adapters_call(self, model: str) -> UnaryCall[list[AdapterInfo]]:
        return UnaryCall(
            self._stub.ListAdapters,
            pb.ListAdaptersRequest(model=model),
            lambda reply: [proto.adapter_info(a) for a in reply.adapters],
        )

    def _abort_call(self, request_ids: str | Sequence[str]) -> UnaryCall[list[str]]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        return UnaryCall(
            self._control.Abort, pb.AbortRequest(request_ids=ids), lambda reply: list(reply.aborted_request_ids)
        )

    def _get_load_call(self, model: str) -> UnaryCall[control.ServerLoad]:
        return UnaryCall(self._control.GetLoad, pb.GetLoadRequest(model=model), control.server_load)

    def _server_info_call(self) -> UnaryCall[control.ServerInfo]:
        return UnaryCall(self._control.GetServerInfo, pb.GetServerInfoRequest(), control.server_info)

    def _start_watch_kv_events(self, model: str, timeout: float | None) -> Any:
        """Start the WatchKvEvents stream (blocking or asyncio, as the channel is); no deadline unless given."""
        request = pb.WatchKvEventsRequest(model=model)
        return self._control.WatchKvEvents(request, timeout=timeout, metadata=self.metadata)

    def _health_call(self, service: str) -> UnaryCall[str]:
        return UnaryCall(
            self._health.Check,
            health_pb2.HealthCheckRequest(service=service),
            lambda reply: health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status),
        )


class ReadinessPoll:
    """The deadline and the last answer of wait_until_ready(), for both clients."""

    def __init__(self, target: str, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.last = "no answer"

    def probes(self) -> Iterator[float]:
        """The deadline of each health check, until the overall one passes."""
        while (left := self.deadline - time.monotonic()) > 0:
            yield max(0.1, min(5.0, left))

    def serving(self, status: str | WeirClientError) -> bool:
        """Note a health check's status (or its failure); True once it is SERVING."""
        self.last = status.code.name if isinstance(status, WeirClientError) else status
        return self.last == "SERVING"

    def expired(self) -> WeirClientError:
        return WeirClientError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{self.target} not SERVING after {self.timeout:.0f}s (last: {self.last})",
        )
