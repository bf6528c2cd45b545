"""A tiny in-process InferenceService for gateway unit tests: deterministic text, no model.

Prompts containing these words change its behaviour: FAIL_INVALID (INVALID_ARGUMENT naming a field),
FAIL_FIELD=<path> (INVALID_ARGUMENT naming that weir.v1 field path), FAIL_EXHAUSTED (RESOURCE_EXHAUSTED with a
retry delay), FAIL_MIDWAY (INTERNAL after the first token), SLOW (a token every 50 ms, so calls stay in flight),
THINK (the first two tokens are reasoning text).

With tools (and a tool choice other than none) each choice calls the forced tool, else the first, as a parser in
the server would tell it: id and name first, then argument fragments, the complete calls on the last message and
FINISH_REASON_TOOL_CALLS. CALL2 makes two calls (the second of the second tool, when there is one), NO_IDS leaves
the server's ids empty, FINAL_ONLY sends no deltas (only the complete calls), SAY_FIRST writes text first."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc

T = TypeVar("T")
GEN_MODEL, EMBED_MODEL = "fake-gen", "fake-embed"
EMBED_DIM = 8


def _token(choice: int, step: int) -> str:
    return f" c{choice}t{step}"


def _prompt_text(request: pb.GenerateRequest) -> str:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return request.prompt
    if kind == "token_ids":
        return " ".join(f"w{i}" for i in request.token_ids.ids)
    return " ".join(
        f"{m.role}: {m.content or chr(10).join(p.text for p in m.content_parts)}" for m in request.messages.messages
    )


def call_arguments(choice: int, call: int) -> str:
    """The arguments the fake gives call `call` of choice `choice`."""
    return json.dumps({"city": "Paris", "choice": choice, "call": call})


def _called_tools(request: pb.GenerateRequest, text: str) -> list[str]:
    """The functions each choice calls, in order; none without tools or with tool_choice none."""
    if not request.tools or request.tool_choice.mode == pb.TOOL_CHOICE_MODE_NONE:
        return []
    forced = request.tool_choice.function if request.tool_choice.WhichOneof("choice") == "function" else ""
    names = [forced or request.tools[0].name]
    if "CALL2" in text:
        names.append(request.tools[min(1, len(request.tools) - 1)].name)
    return names


def _logprob(token_id: int, text: str, top: int) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=token_id,
        token=text,
        logprob=-0.5,
        token_bytes=text.encode(),
        top_logprobs=[pb.TopLogprob(token_id=k, token=f"alt{k}", logprob=-1.0 - k) for k in range(top)],
    )


async def _abort(context: grpc.aio.ServicerContext, code: int, message: str, detail: Any) -> None:
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(detail)
    converted = rpc_status.to_status(status)
    await context.abort(converted.code, converted.details, converted.trailing_metadata)


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    """Counts what it saw so tests can check metadata, deadlines and cancellation."""

    def __init__(self) -> None:
        self.active = 0
        self.cancelled = 0
        self.calls = 0
        self.request_ids: list[str] = []
        self.deadlines: list[float | None] = []
        self.requests: list[pb.GenerateRequest] = []

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        self.requests.append(request)
        self.request_ids.append(dict(context.invocation_metadata() or ()).get("x-request-id", ""))
        self.deadlines.append(context.time_remaining())
        text = _prompt_text(request)
        if "FAIL_INVALID" in text:
            violation = error_details_pb2.BadRequest.FieldViolation(field="sampling_params.temperature")
            detail = error_details_pb2.BadRequest(field_violations=[violation])
            await _abort(context, code_pb2.INVALID_ARGUMENT, "sampling_params.temperature: too hot", detail)
        if (field := re.search(r"FAIL_FIELD=(\S+)", text)) is not None:
            violation = error_details_pb2.BadRequest.FieldViolation(field=field.group(1))
            detail = error_details_pb2.BadRequest(field_violations=[violation])
            await _abort(context, code_pb2.INVALID_ARGUMENT, f"{field.group(1)}: refused by the fake", detail)
        if "FAIL_EXHAUSTED" in text:
            detail = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3))
            await _abort(context, code_pb2.RESOURCE_EXHAUSTED, "queue is full", detail)
        self.active += 1
        generate = self._call_tools if _called_tools(request, text) else self._generate
        try:
            async for message in generate(request, text, context):
                yield message
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _generate(self, request: pb.GenerateRequest, text: str, context: grpc.aio.ServicerContext) -> Any:
        p = request.sampling_params
        max_tokens = p.max_tokens if p.HasField("max_tokens") else 16
        n = p.n if p.HasField("n") else 1
        prompt_ids = list(request.token_ids.ids) or [len(w) for w in text.split()] or [0]
        texts = [""] * n
        done = [False] * n
        for step in range(max_tokens):
            if "SLOW" in text:
                await asyncio.sleep(0.05)
            if "FAIL_MIDWAY" in text and step == 1:
                await context.abort(grpc.StatusCode.INTERNAL, "the engine fell over")
            for c in range(n):
                if done[c]:
                    continue
                piece = _token(c, step)
                message = pb.GenerateResponse(request_id=request.request_id, index=c, model=request.model or GEN_MODEL)
                if step == 0:
                    message.prompt_token_ids.extend(prompt_ids)
                    if p.HasField("prompt_logprobs"):
                        first = pb.TokenLogprob(token_id=prompt_ids[0], token=f"w{prompt_ids[0]}")
                        rest = [_logprob(t, f" w{t}", p.prompt_logprobs) for t in prompt_ids[1:]]
                        message.prompt_logprobs.extend([first, *rest])
                stop = next((s for s in p.stop if s in texts[c] + piece), None)
                if stop is not None:
                    piece = (texts[c] + piece).split(stop)[0][len(texts[c]) :]
                texts[c] += piece
                if "THINK" in text and step < 2:
                    message.reasoning_text = piece
                else:
                    message.text = piece
                message.token_ids.append(100 + step)
                if p.HasField("logprobs"):
                    message.logprobs.append(_logprob(100 + step, piece, p.logprobs))
                if stop is not None or step == max_tokens - 1:
                    done[c] = True
                    message.finish_reason = pb.FINISH_REASON_STOP_SEQUENCE if stop else pb.FINISH_REASON_LENGTH
                    message.stop_reason = stop or ""
                    used = step + 1
                    message.usage.CopyFrom(
                        pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=used,
                                 total_tokens=len(prompt_ids) + used)
                    )  # fmt: skip
                yield message
            if all(done):
                return

    async def _call_tools(self, request: pb.GenerateRequest, text: str, context: grpc.aio.ServicerContext) -> Any:
        n = request.sampling_params.n if request.sampling_params.HasField("n") else 1
        names = _called_tools(request, text)
        for c in range(n):
            head = pb.GenerateResponse(request_id=request.request_id, index=c, model=request.model or GEN_MODEL)
            if "THINK" in text:
                yield pb.GenerateResponse(index=c, reasoning_text="Paris is a city. ")
            if "SAY_FIRST" in text:
                head.text = "Let me look. "
            complete = []
            for k, name in enumerate(names):
                call = pb.ToolCall(id="" if "NO_IDS" in text else f"call-{c}-{k}", name=name,
                                   arguments=call_arguments(c, k), index=k)  # fmt: skip
                complete.append(call)
                if "FINAL_ONLY" in text:
                    continue
                head.tool_call_deltas.add(index=k, id=call.id, name=name)
                yield head
                head = pb.GenerateResponse(index=c)
                for i in range(0, len(call.arguments), 7):
                    yield pb.GenerateResponse(index=c, tool_call_deltas=[
                        pb.ToolCallDelta(index=k, arguments=call.arguments[i : i + 7])])  # fmt: skip
            last = pb.GenerateResponse(index=c, finish_reason=pb.FINISH_REASON_TOOL_CALLS, tool_calls=complete)
            last.MergeFrom(head)  # text or the model not sent yet
            last.usage.CopyFrom(pb.Usage(prompt_tokens=3, completion_tokens=10, total_tokens=13))
            yield last

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        inputs = list(request.texts) or [list(t.ids) for t in request.token_ids]
        dim = request.dimensions or EMBED_DIM
        if dim > 64:  # as a real server refuses more dimensions than its model has
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dimensions: at most 64, got {dim}")
        return pb.EmbedResponse(
            model=request.model or EMBED_MODEL,
            embeddings=[pb.Embedding(index=i, values=[0.5 + i] * dim) for i in range(len(inputs))],
            usage=pb.Usage(prompt_tokens=3 * len(inputs), total_tokens=3 * len(inputs)),
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        results = [
            pb.Tokenization(token_ids=[len(w) for w in text.split()], tokens=text.split()) for text in request.texts
        ]
        return pb.TokenizeResponse(model=request.model or GEN_MODEL, results=results, max_model_len=128)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        texts = [" ".join(f"w{i}" for i in seq.ids) for seq in request.sequences]
        return pb.DetokenizeResponse(model=request.model or GEN_MODEL, texts=texts)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(id=GEN_MODEL, task=pb.MODEL_TASK_GENERATE, max_context_length=128, is_default=True),
                pb.ModelInfo(id=EMBED_MODEL, task=pb.MODEL_TASK_EMBED, max_context_length=64, is_default=True),
            ]
        )


class FakeServer:
    """A FakeInference on a loopback port with the standard health service."""

    def __init__(self) -> None:
        self.servicer = FakeInference()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakeServer:
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


class BackgroundLoop:
    """An event loop on its own thread, so sync clients in the test thread can call servers running on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-tests", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
