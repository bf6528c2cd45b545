"""weir.v1.InferenceService: converts protobuf to engine calls and back, nothing more."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_server.api import convert
from weir_server.api.errors import map_errors
from weir_server.api.models import ModelRegistry, ServedModel
from weir_server.api.observer import Observability
from weir_server.chat.frontend import ChatPrompt
from weir_server.chat.output import ChoiceDelta, ChoiceParser
from weir_server.chat.template import template_kwargs
from weir_server.engine.types import Constraint, GenerationOutput, GenerationRequest
from weir_server.errors import EngineStepError, EngineUnavailableError, InvalidRequestError
from weir_server.parsers.tool_parser import ToolCall

REQUEST_ID_KEY = "x-request-id"
VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # what gRPC metadata and log lines carry safely
_MODEL_TASKS = {"generate": pb.MODEL_TASK_GENERATE, "embed": pb.MODEL_TASK_EMBED}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Every RPC of weir.v1.InferenceService over the registry's engines."""

    def __init__(self, registry: ModelRegistry, observability: Observability | None = None) -> None:
        self.registry = registry
        self.observability = observability or Observability()

    @map_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        model = self.registry.get(request.model, "generate")
        engine = model.generator
        if engine is None:
            raise EngineUnavailableError(f"model {model.id!r} has no generation engine")
        answer = convert.constraint(request)
        prompt_ids, chat = self._prompt(request, model, answer)
        params = convert.sampling_params(request.sampling_params)  # the engine validates them
        caller_id = request.request_id or _metadata_request_id(context)
        if caller_id and not VALID_REQUEST_ID.fullmatch(caller_id):
            raise InvalidRequestError("request_id", "must be 1 to 128 printable ASCII characters without spaces")
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
        )
        observer = self.observability.generation(model.id, request_id, params.n)
        stream = engine.generate(engine_request)
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
                    model=model.id,
                    tokenizer=model.tokenizer,
                    prompt_token_ids=prompt_ids if first else None,
                    parsed=parsed,
                    calls=calls,
                )
                await context.write(response)
        finally:
            # Closing the stream aborts the request in the engine (client gone, deadline or error).
            await _aclose(stream)
            observer.finish()

    def _prompt(
        self, request: pb.GenerateRequest, model: ServedModel, answer: Constraint | None
    ) -> tuple[list[int], ChatPrompt | None]:
        """The prompt's token ids, and for a chat its rendering (constraint and output parsers included)."""
        kind = request.WhichOneof("input")
        tokenizer = model.tokenizer
        chat = None
        if kind != "messages" and (request.tools or request.chat_template_kwargs):
            raise InvalidRequestError("tools" if request.tools else "chat_template_kwargs", "needs `messages`")
        if kind == "prompt":
            if not request.prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            tokenizer.check_text_length(request.prompt, "prompt", model.loaded.max_model_len)
            ids = tokenizer.encode(request.prompt)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidRequestError("token_ids", "must hold at least one token id")
            tokenizer.check_ids(ids, "token_ids", limit=model.loaded.vocab_size)
        elif kind == "messages":
            messages = request.messages
            size = sum(_message_chars(m) for m in messages.messages) + sum(
                len(t.description) + len(t.parameters) for t in request.tools
            )
            tokenizer.check_chars(size, "messages", model.loaded.max_model_len)
            add_generation_prompt = (
                messages.add_generation_prompt if messages.HasField("add_generation_prompt") else True
            )
            if model.chat is None:
                raise InvalidRequestError("messages", "this model has no tokenizer to render a chat with")
            chat = model.chat.render(
                convert.chat_messages(messages),
                convert.tools(request),
                add_generation_prompt,
                template_kwargs(request.chat_template_kwargs),
                answer,
            )
            ids = tokenizer.encode(chat.text, add_special_tokens=False)  # the template holds the special tokens
        else:
            raise InvalidRequestError("input", "set exactly one of prompt, token_ids or messages")
        if not ids:
            raise InvalidRequestError(kind, "tokenizes to no tokens")
        limit = model.loaded.max_model_len
        if len(ids) >= limit:
            raise InvalidRequestError(
                kind, f"is {len(ids)} tokens long; this model's context is {limit} tokens including the output"
            )
        return ids, chat

    @map_errors
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._embed(request)

    @map_errors
    async def EmbedStream(self, requests: AsyncIterator[pb.EmbedStreamRequest], context: Any) -> None:
        async for message in requests:
            response = await self._embed(message.request)
            await context.write(pb.EmbedStreamResponse(response=response))

    async def _embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        model = self.registry.get(request.model, "embed")
        if model.embedder is None:
            raise EngineUnavailableError(f"model {model.id!r} has no embedding engine")
        field, inputs = self._embed_inputs(request, model)
        pooling = convert.POOLINGS.get(request.pooling)
        normalize = request.normalize if request.HasField("normalize") else True
        dimensions = request.dimensions or None
        vectors = await model.embedder.embed(inputs, pooling, normalize, dimensions, input_field=field)
        return pb.EmbedResponse(
            model=model.id,
            embeddings=[pb.Embedding(index=i, values=v) for i, v in enumerate(vectors)],
            usage=pb.Usage(prompt_tokens=sum(map(len, inputs)), total_tokens=sum(map(len, inputs))),
        )

    def _embed_inputs(self, request: pb.EmbedRequest, model: ServedModel) -> tuple[str, list[list[int]]]:
        """The request's input field and its token ids (the engine checks lengths and id ranges)."""
        if request.texts and request.token_ids:
            raise InvalidRequestError("token_ids", "set texts or token_ids, not both")
        if not request.texts and not request.token_ids:
            raise InvalidRequestError("texts", "set at least one text (or token_ids)")
        max_length = model.loaded.max_model_len if request.truncate else None
        if request.texts:
            if max_length is None:
                for i, text in enumerate(request.texts):
                    model.tokenizer.check_text_length(text, f"texts[{i}]", model.loaded.max_model_len)
            return "texts", [model.tokenizer.encode(text, max_length=max_length) for text in request.texts]
        return "token_ids", [list(t.ids)[:max_length] for t in request.token_ids]

    @map_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        return self._tokenize(request)

    @map_errors
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        return self._detokenize(request)

    @map_errors
    async def TokenizeStream(self, requests: AsyncIterator[pb.TokenizeStreamRequest], context: Any) -> None:
        async for message in requests:
            kind = message.WhichOneof("request")
            if kind == "tokenize":
                response = pb.TokenizeStreamResponse(tokenize=self._tokenize(message.tokenize))
            elif kind == "detokenize":
                response = pb.TokenizeStreamResponse(detokenize=self._detokenize(message.detokenize))
            else:
                raise InvalidRequestError("request", "set tokenize or detokenize")
            await context.write(response)

    def _tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        model = self.registry.get(request.model, None)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        results = []
        for text in request.texts:
            tokens = model.tokenizer.tokenize(text, add_special, request.return_offsets)
            result = pb.Tokenization(token_ids=tokens.token_ids, tokens=tokens.tokens)
            for start, end in tokens.offsets or ():
                result.offsets.add(start=start, end=end)
            results.append(result)
        return pb.TokenizeResponse(model=model.id, results=results, max_model_len=model.loaded.max_model_len)

    def _detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        model = self.registry.get(request.model, None)
        skip_special = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        texts = []
        for i, sequence in enumerate(request.sequences):
            model.tokenizer.check_ids(sequence.ids, f"sequences[{i}]")
            texts.append(model.tokenizer.decode(sequence.ids, skip_special))
        return pb.DetokenizeResponse(model=model.id, texts=texts)

    @map_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if not self.registry.ready:
            raise EngineUnavailableError("the server is still loading its models; retry shortly")
        return pb.ListModelsResponse(models=[_model_info(m) for m in self.registry.models()])


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


def _message_chars(message: pb.ChatMessage) -> int:
    """The characters a turn adds to the prompt, before the template's own."""
    parts = sum(len(p.text) for p in message.content_parts)
    calls = sum(len(c.name) + len(c.arguments) for c in message.tool_calls)
    return len(message.content) + parts + calls


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
