"""Load a Weir server through its `weir.v1` gRPC API (generated stubs over grpc.aio), token ids in and out."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from grpc import aio

from weir.v1 import inference_pb2, inference_pb2_grpc
from weir_bench.load import RequestTiming
from weir_bench.peers import TargetError

logger = logging.getLogger(__name__)

# Generous message limits: a long prompt of token ids must never be what fails.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


async def grpc_ready(address: str) -> bool:
    """Whether a Weir server at `address` answers ListModels with a generation model."""
    try:
        async with aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            reply = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2.0)
    except aio.AioRpcError as exc:
        logger.debug("%s not ready: %s", address, exc.code())
        return False
    return any(m.task == inference_pb2.MODEL_TASK_GENERATE for m in reply.models)


class GrpcDriver:
    """Streams Generate calls over one shared channel (HTTP/2 multiplexes the concurrent streams). With `models`, the
    k-th request names `models[k % len(models)]` instead of `model` (the LoRA scenario's adapters, mixed per batch)."""

    def __init__(
        self,
        address: str,
        name: str = "weir-grpc",
        model: str = "",
        pid: int | None = None,
        temperature: float = 0.0,
        timeout_s: float = 600.0,
        models: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.address = address
        self.model = model
        self.models = list(models)
        self._sent = 0
        self.pid = pid
        self.temperature = temperature
        self.timeout_s = timeout_s
        self._channel = aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)

    def peak_rss_pid(self) -> int | None:
        return self.pid

    async def vocab_size(self) -> int | None:
        try:
            reply = await self._stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30.0)
        except aio.AioRpcError as exc:
            raise TargetError(f"{self.name}: ListModels failed: {exc.code().name}: {exc.details()}") from exc
        generators = [m for m in reply.models if m.task == inference_pb2.MODEL_TASK_GENERATE]
        chosen = next((m for m in generators if m.id == self.model or (not self.model and m.is_default)), None)
        chosen = chosen or (generators[0] if generators and not self.model else None)
        return chosen.vocab_size if chosen is not None and chosen.vocab_size else None

    async def tokenize(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of `texts` from the served model's tokenizer (the Tokenize RPC)."""
        request = inference_pb2.TokenizeRequest(model=self.model, texts=list(texts))
        request.add_special_tokens = add_special_tokens
        try:
            reply = await self._stub.Tokenize(request, timeout=self.timeout_s)
        except aio.AioRpcError as exc:
            raise TargetError(f"{self.name}: Tokenize failed: {exc.code().name}: {exc.details()}") from exc
        return [list(result.token_ids) for result in reply.results]

    def _request(self, prompt: list[int], output_tokens: int) -> inference_pb2.GenerateRequest:
        model = self.models[self._sent % len(self.models)] if self.models else self.model
        self._sent += 1
        return inference_pb2.GenerateRequest(
            model=model,
            token_ids=inference_pb2.TokenIds(ids=prompt),
            sampling_params=inference_pb2.SamplingParams(
                max_tokens=output_tokens,
                min_tokens=output_tokens,
                ignore_eos=True,
                temperature=self.temperature,
            ),
        )

    async def generate(self, prompt: list[int], output_tokens: int) -> RequestTiming:
        request = self._request(prompt, output_tokens)
        timing = RequestTiming.begin()
        server_count: int | None = None
        try:
            async for message in self._stub.Generate(request, timeout=self.timeout_s):
                timing.record(len(message.token_ids))
                if message.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
                    continue
                if message.HasField("usage"):  # the last message of the choice carries its counts
                    server_count = message.usage.completion_tokens
                    timing.cached_tokens = message.usage.cached_tokens
                if message.finish_reason == inference_pb2.FINISH_REASON_ERROR:
                    return timing.finish(server_count, error="the server reported FINISH_REASON_ERROR")
        except aio.AioRpcError as exc:
            return timing.finish(error=f"gRPC {exc.code().name}: {exc.details()}")
        return timing.finish(server_count)

    async def close(self) -> None:
        await self._channel.close()
