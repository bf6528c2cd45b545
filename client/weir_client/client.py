"""WeirClient: a blocking client for weir.v1.InferenceService. Every failure raises WeirClientError."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_client import _protocol as proto
from weir_client.errors import WeirClientError, error_from_rpc
from weir_client.security import TlsOptions, channel_security, with_auth
from weir_client.types import (
    Completion,
    Embeddings,
    GenerateOptions,
    GenerationChunk,
    ModelInfo,
    Tokenization,
    collect,
)

_UNSET: Any = object()


class WeirClient:
    """Blocking client. `timeout` (seconds) is the default deadline of every call; each method takes its own.

    Idempotent calls (embed, tokenize, detokenize, list_models, health) are retried on UNAVAILABLE up to
    `max_attempts` times by gRPC itself; generate is never retried. Use as a context manager to close the channel.
    `load_balancing="round_robin"` with a multi-address target (`dns:///svc:50051`, `ipv4:a:p,b:p`) spreads calls
    over the healthy servers. `tls=True` (system roots) or `tls=TlsOptions(ca_file=..., cert_file=..., key_file=...)`
    connects over TLS / mutual TLS; `api_key` is sent as `authorization: Bearer KEY` to servers run with `--api-key`.
    """

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
        options = proto.channel_options(max_attempts, load_balancing) + tls_options
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.target = target
        self.timeout = timeout
        self.metadata = with_auth(metadata, api_key)

    def __enter__(self) -> WeirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        token_ids: Sequence[int] | None = None,
        model: str = "",
        request_id: str = "",
        add_generation_prompt: bool = True,
        timeout: float | None = _UNSET,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[GenerationChunk]:
        """Stream the completion of one input (a prompt, chat `messages` or `token_ids`) as chunks.

        `messages` and the keywords take OpenAI's shapes: sampling (SamplingOptions, with `logit_bias`), then
        `tools`, `tool_choice`, `chat_template_kwargs` and at most one constraint of `json_schema`, `json_object`,
        `regex`, `choice`, `grammar` (OutputOptions). Leaving the loop early cancels the request on the server.
        """
        request = proto.generate_request(prompt, messages, token_ids, model, request_id, add_generation_prompt, options)
        call = self._stub.Generate(request, timeout=self._timeout(timeout), metadata=self.metadata)
        return self._chunks(call)

    @staticmethod
    def _chunks(call: Any) -> Iterator[GenerationChunk]:
        try:
            for message in call:
                yield proto.generation_chunk(message)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        token_ids: Sequence[int] | None = None,
        model: str = "",
        request_id: str = "",
        add_generation_prompt: bool = True,
        timeout: float | None = _UNSET,
        **options: Unpack[GenerateOptions],
    ) -> Completion:
        """Like generate(), but wait for the end and return the whole Completion."""
        return collect(
            self.generate(
                prompt,
                messages=messages,
                token_ids=token_ids,
                model=model,
                request_id=request_id,
                add_generation_prompt=add_generation_prompt,
                timeout=timeout,
                **options,
            )
        )

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
        timeout: float | None = _UNSET,
    ) -> Embeddings:
        """One vector per text (or token id sequence); `pooling` is None (model default), mean, cls or last."""
        request = proto.embed_request(texts, token_ids, model, pooling, normalize, dimensions, truncate)
        return proto.embeddings(self._unary(self._stub.Embed, request, timeout))

    def tokenize(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        add_special_tokens: bool = True,
        return_offsets: bool = False,
        timeout: float | None = _UNSET,
    ) -> list[Tokenization]:
        """Tokenize each text with the model's tokenizer (default: the generation model's)."""
        request = pb.TokenizeRequest(
            model=model,
            texts=proto.texts_list(texts),
            add_special_tokens=add_special_tokens,
            return_offsets=return_offsets,
        )
        return proto.tokenizations(self._unary(self._stub.Tokenize, request, timeout), return_offsets)

    def detokenize(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        model: str = "",
        skip_special_tokens: bool = True,
        timeout: float | None = _UNSET,
    ) -> list[str]:
        """The text of each token id sequence."""
        request = pb.DetokenizeRequest(
            model=model, sequences=proto.token_ids_messages(sequences), skip_special_tokens=skip_special_tokens
        )
        return list(self._unary(self._stub.Detokenize, request, timeout).texts)

    def list_models(self, *, timeout: float | None = _UNSET) -> list[ModelInfo]:
        """The models the server has loaded."""
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [proto.model_info(m) for m in response.models]

    def health(self, service: str = "", *, timeout: float | None = _UNSET) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 0.25) -> None:
        """Block until health is SERVING; raise WeirClientError(DEADLINE_EXCEEDED) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except WeirClientError as e:
                last = e.code.name
            time.sleep(interval)
        raise WeirClientError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.target} not SERVING after {timeout:.0f}s (last: {last})"
        )

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self.metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
