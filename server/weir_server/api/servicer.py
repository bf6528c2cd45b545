"""weir.v1.InferenceService: converts protobuf to engine calls and back, nothing more."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_server.api import adapters, convert
from weir_server.api.admission import Admission, check_context
from weir_server.api.control import RunningRequests
from weir_server.api.errors import map_errors
from weir_server.api.model_registry import ServedModel, ServedModels
from weir_server.api.observer import Observability
from weir_server.api.workers import WorkerPool
from weir_server.chat.frontend import ChatPrompt
from weir_server.chat.output import ChoiceDelta, ChoiceParser
from weir_server.chat.template import template_kwargs
from weir_server.config import LimitsConfig
from weir_server.engine.types import Constraint, GenerationOutput, GenerationRequest
from weir_server.errors import EngineStepError, EngineUnavailableError, InvalidRequestError
from weir_server.parsers.tool_parser import ToolCall
from weir_server.tokenization import Checkpoint, keep_going

REQUEST_ID_KEY = "x-request-id"
VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # what gRPC metadata and log lines carry safely
# Prompts this small are prepared on the event loop: a worker hop costs more than the work, and at hundreds of
# requests arriving at once the hops spread their admission over many engine steps (on an H100, 512 streams from
# four client processes ran at 23-64k tokens/s through the workers and 91k inline; bench/RESULTS.md, 2026-12-06).
_INLINE_PROMPT_CHARS = 4096


def _cheap_prompt(request: pb.GenerateRequest) -> bool:
    """Whether preparing the prompt is bounded by a few hundred microseconds: token ids (a range check) or a short
    text (one Rust tokenizer call). Chats (template rendering) and long texts go to the workers."""
    kind = request.WhichOneof("input")
    return kind == "token_ids" or (kind == "prompt" and len(request.prompt) <= _INLINE_PROMPT_CHARS)


_MODEL_TASKS = {"generate": pb.MODEL_TASK_GENERATE, "embed": pb.MODEL_TASK_EMBED}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Every RPC of weir.v1.InferenceService over the registry's engines. Requests are checked against the limits
    on the event loop; their tokenizing, rendering and detokenizing run on worker threads, within their deadline.
    `parse_special_tokens`: special-token strings in a raw prompt or Tokenize/Embed texts are special tokens."""

    def __init__(
        self,
        registry: ServedModels,
        observability: Observability | None = None,
        limits: LimitsConfig | None = None,
        parse_special_tokens: bool = False,
        running: RunningRequests | None = None,
    ) -> None:
        self.registry = registry
        self.running = running if running is not None else RunningRequests()  # the calls ControlService.Abort can end
        self.observability = observability or Observability()
        self.limits = limits or LimitsConfig()
        self.admission = Admission(self.limits)
        self.workers = WorkerPool(self.limits.frontend_threads)
        self.parse_special_tokens = parse_special_tokens

    def shutdown(self) -> None:
        """The server is stopping: calls waiting on tokenizing work end now (UNAVAILABLE)."""
        self.workers.shutdown()

    @map_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        model, adapter = self.registry.resolve_generation(request.model, request.adapter)
        engine = model.generator
        if engine is None:
            raise EngineUnavailableError(f"model {model.id!r} has no generation engine")
        self.admission.generate(request, model)
        caller_id = request.request_id or _metadata_request_id(context)
        if caller_id and not VALID_REQUEST_ID.fullmatch(caller_id):
            raise InvalidRequestError("request_id", "must be 1 to 128 printable ASCII characters without spaces")
        with self.running.preparing(caller_id):  # ControlService.Abort reaches the call here too
            answer = convert.constraint(request)
            prepare = functools.partial(self._prompt, request, model, answer)
            if _cheap_prompt(request):
                prompt_ids, chat = prepare(keep_going)
            else:
                prompt_ids, chat = await self.workers.run(prepare, context.time_remaining())
            params = convert.sampling_params(request.sampling_params)  # the engine validates them
            constraint = chat.constraint if chat is not None else answer
            if answer is not None and constraint is not answer:
                await engine.prepare_constraint(answer)  # its own errors name its own field
            if constraint is not None:
                await _prepare_constraint(engine, constraint)  # compiled off the event loop, before admission
        request_id = caller_id or uuid.uuid4().hex
        # Every response carries the id; the trailers too. Not sent as initial metadata: that is one more write per
        # call, which at hundreds of streams arriving at once measurably delayed admission.
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        # The engine needs unique ids; a caller may reuse theirs, so the engine gets a suffixed one.
        engine_request = GenerationRequest(
            request_id=f"{caller_id}.{uuid.uuid4().hex[:8]}" if caller_id else request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            constraint=constraint,
            adapter=adapter,
        )
        operation = "chat" if chat is not None else "text_completion"
        observer = self.observability.generation(model.id, request_id, params, operation)
        stream = engine.generate(engine_request)
        self.running.add(request_id, engine_request.request_id, engine)
        parsers: dict[int, ChoiceParser | None] = {}
        try:
            async for output in stream:
                observer.output(output)
                if output.error is not None:
                    raise EngineStepError(output.error)
                first = output.index not in parsers
                if first:
                    parsers[output.index] = chat.choice_parser() if chat is not None else None
                parser = parsers[output.index]
                parsed, calls = _parse(parser, output) if parser is not None else (None, [])
                response = convert.generate_response(
                    output,
                    request_id=request_id,
                    model=adapter or model.id,  # as vLLM: the adapter is the model the caller asked for
                    tokenizer=model.tokenizer,
                    prompt_token_ids=prompt_ids if first else None,
                    parsed=parsed,
                    calls=calls,
                )
                await context.write(response)
        finally:
            self.running.remove(request_id, engine_request.request_id)
            # Closing the stream aborts the request in the engine (client gone, deadline or error).
            await _aclose(stream)
            observer.finish()

    def _prompt(
        self, request: pb.GenerateRequest, model: ServedModel, answer: Constraint | None, checkpoint: Checkpoint
    ) -> tuple[list[int], ChatPrompt | None]:
        """On a worker thread (inline for a cheap prompt): the prompt's token ids, and for a chat its rendering
        (constraint and output parsers included). Admission has checked the sizes."""
        kind = request.WhichOneof("input")
        tokenizer = model.tokenizer
        chat = None
        if kind != "messages" and (request.tools or request.chat_template_kwargs):
            raise InvalidRequestError("tools" if request.tools else "chat_template_kwargs", "needs `messages`")
        if kind == "prompt":
            if not request.prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            ids = tokenizer.encode(request.prompt, parse_special=self.parse_special_tokens)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidRequestError("token_ids", "must hold at least one token id")
            tokenizer.check_ids(ids, "token_ids", limit=model.loaded.vocab_size)
        elif kind == "messages":
            messages = request.messages
            add_generation_prompt = (
                messages.add_generation_prompt if messages.HasField("add_generation_prompt") else True
            )
            if model.chat is None:
                raise InvalidRequestError("messages", "this model has no tokenizer to render a chat with")
            kwargs = template_kwargs(request.chat_template_kwargs, self.limits.max_chat_template_kwargs_bytes)
            chat = model.chat.render(
                convert.chat_messages(messages),
                convert.tools(request),
                add_generation_prompt,
                kwargs,
                answer,
                checkpoint=checkpoint,
            )
            ids = chat.token_ids
        else:
            raise InvalidRequestError("input", "set exactly one of prompt, token_ids or messages")
        if not ids:
            raise InvalidRequestError(kind, "tokenizes to no tokens")
        check_context(kind, len(ids), model.loaded.max_model_len)
        return ids, chat

    @map_errors
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        response = await self._embed(request, context)
        self.observability.embedding(response.model, response.usage.prompt_tokens, request.dimensions or None)
        return response

    @map_errors
    async def EmbedStream(self, requests: AsyncIterator[pb.EmbedStreamRequest], context: Any) -> None:
        async for message in requests:
            response = await self._embed(message.request, context)
            await context.write(pb.EmbedStreamResponse(response=response))

    async def _embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        model = self.registry.get(request.model, "embed")
        if model.embedder is None:
            raise EngineUnavailableError(f"model {model.id!r} has no embedding engine")
        self.admission.embed(request, model)
        field, inputs = await self.workers.run(
            functools.partial(self._embed_inputs, request, model), context.time_remaining()
        )
        pooling = convert.POOLINGS.get(request.pooling)
        normalize = request.normalize if request.HasField("normalize") else True
        dimensions = request.dimensions or None
        vectors = await model.embedder.embed(inputs, pooling, normalize, dimensions, input_field=field)
        tokens = sum(map(len, inputs))

        def reply(checkpoint: Checkpoint) -> pb.EmbedResponse:
            response = pb.EmbedResponse(
                model=model.id,
                embeddings=[pb.Embedding(index=i, values=v) for i, v in enumerate(vectors)],
                usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
            )
            self.admission.reply(response, field)
            return response

        return await self.workers.run(reply, context.time_remaining())

    def _embed_inputs(
        self, request: pb.EmbedRequest, model: ServedModel, checkpoint: Checkpoint
    ) -> tuple[str, list[list[int]]]:
        """Worker thread: the request's input field and its token ids (the engine checks lengths and id ranges)."""
        if request.texts and request.token_ids:
            raise InvalidRequestError("token_ids", "set texts or token_ids, not both")
        if not request.texts and not request.token_ids:
            raise InvalidRequestError("texts", "set at least one text (or token_ids)")
        context = model.loaded.max_model_len
        max_length = context if request.truncate else None
        if not request.texts:
            return "token_ids", [list(t.ids[:max_length]) for t in request.token_ids]
        inputs = []
        for i, text in enumerate(request.texts):
            checkpoint()
            if max_length is None:
                model.tokenizer.check_text_length(text, f"texts[{i}]", context)
            inputs.append(model.tokenizer.encode(text, max_length=max_length, parse_special=self.parse_special_tokens))
        return "texts", inputs

    @map_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        return await self._tokenize(request, context)

    @map_errors
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        return await self._detokenize(request, context)

    @map_errors
    async def TokenizeStream(self, requests: AsyncIterator[pb.TokenizeStreamRequest], context: Any) -> None:
        async for message in requests:
            kind = message.WhichOneof("request")
            if kind == "tokenize":
                response = pb.TokenizeStreamResponse(tokenize=await self._tokenize(message.tokenize, context))
            elif kind == "detokenize":
                response = pb.TokenizeStreamResponse(detokenize=await self._detokenize(message.detokenize, context))
            else:
                raise InvalidRequestError("request", "set tokenize or detokenize")
            await context.write(response)

    async def _tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        model = self.registry.get(request.model, None)
        self.admission.tokenize(request)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True

        def tokenize(checkpoint: Checkpoint) -> pb.TokenizeResponse:
            results = []
            for text in request.texts:
                checkpoint()
                tokens = model.tokenizer.tokenize(
                    text, add_special, request.return_offsets, self.parse_special_tokens, checkpoint
                )
                result = pb.Tokenization(token_ids=tokens.token_ids, tokens=tokens.tokens)
                for start, end in tokens.offsets or ():
                    result.offsets.add(start=start, end=end)
                results.append(result)
            response = pb.TokenizeResponse(model=model.id, results=results, max_model_len=model.loaded.max_model_len)
            self.admission.reply(response, "texts")
            return response

        return await self.workers.run(tokenize, context.time_remaining())

    async def _detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        model = self.registry.get(request.model, None)
        self.admission.detokenize(request)
        skip_special = request.skip_special_tokens if request.HasField("skip_special_tokens") else True

        def detokenize(checkpoint: Checkpoint) -> pb.DetokenizeResponse:
            texts = []
            for i, sequence in enumerate(request.sequences):
                checkpoint()
                ids = list(sequence.ids)
                model.tokenizer.check_ids(ids, f"sequences[{i}]")
                texts.append(model.tokenizer.decode(ids, skip_special))
            response = pb.DetokenizeResponse(model=model.id, texts=texts)
            self.admission.reply(response, "sequences")
            return response

        return await self.workers.run(detokenize, context.time_remaining())

    @map_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if not self.registry.ready:
            raise EngineUnavailableError("the server is still loading its models; retry shortly")
        infos = []
        for model in self.registry.models():
            infos.append(_model_info(model))
            infos += adapters.adapter_model_infos(model, infos[-1])
        return pb.ListModelsResponse(models=infos)

    @map_errors
    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        return await adapters.load_adapter(self.registry, request)

    @map_errors
    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        return await adapters.unload_adapter(self.registry, request)

    @map_errors
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        if not self.registry.ready:
            raise EngineUnavailableError("the server is still loading its models; retry shortly")
        return adapters.list_adapters(self.registry, request)


def _model_info(model: ServedModel) -> pb.ModelInfo:
    loaded = model.loaded
    return pb.ModelInfo(
        id=model.id,
        task=_MODEL_TASKS[model.task],
        max_context_length=loaded.max_model_len,
        vocab_size=loaded.vocab_size,
        architecture=loaded.architecture,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        is_default=model.is_default,
    )


async def _prepare_constraint(engine: Any, constraint: Constraint) -> None:
    """Compile the constraint before admission; the tool-call grammar's errors are the tools' fault."""
    try:
        await engine.prepare_constraint(constraint)
    except InvalidRequestError as e:
        if constraint.kind == "structural_tag":
            message = f"the tools' schemas do not compile to a grammar: {e.description}"
            raise InvalidRequestError("tools", message) from e
        raise


def _parse(parser: ChoiceParser, output: GenerationOutput) -> tuple[ChoiceDelta, list[ToolCall]]:
    """The output split into answer, reasoning and call deltas; on a choice's last output, its complete calls."""
    parsed = parser.feed(output.text)
    if not output.finished:
        return parsed, []
    rest = parser.finish()
    merged = ChoiceDelta(
        parsed.content + rest.content, parsed.reasoning + rest.reasoning, parsed.tool_calls + rest.tool_calls
    )
    return merged, parser.calls


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return value
    return None


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
