"""Protobuf ⇄ engine types. Pure functions; the servicer strings them together."""

from __future__ import annotations

from collections.abc import Sequence

from weir.v1 import inference_pb2 as pb
from weir_server.chat.messages import ChatMessage, ToolCallRef
from weir_server.chat.output import ChoiceDelta
from weir_server.chat.tools import RawTool, ToolRequest, tool_request
from weir_server.engine.types import Constraint, FinishReason, GenerationOutput, SamplingParams, TokenLogprob
from weir_server.errors import InvalidRequestError
from weir_server.parsers.tool_parser import ToolCall, ToolCallDelta
from weir_server.tokenization import Tokenizer

_DEFAULTS = SamplingParams()

FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}

POOLINGS = {pb.POOLING_UNSPECIFIED: None, pb.POOLING_MEAN: "mean", pb.POOLING_CLS: "cls", pb.POOLING_LAST: "last"}


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    """Engine sampling parameters from the request's; unset optional fields take the defaults the proto names."""

    def has(name: str) -> bool:
        return p.HasField(name)

    return SamplingParams(
        max_tokens=p.max_tokens if has("max_tokens") else _DEFAULTS.max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature if has("temperature") else _DEFAULTS.temperature,
        top_p=p.top_p if has("top_p") else _DEFAULTS.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if has("repetition_penalty") else _DEFAULTS.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed if has("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if has("logprobs") else None,
        prompt_logprobs=p.prompt_logprobs if has("prompt_logprobs") else None,
        n=p.n if has("n") else _DEFAULTS.n,
        skip_special_tokens=p.skip_special_tokens if has("skip_special_tokens") else True,
        include_stop_str_in_output=p.include_stop_str_in_output,
        logit_bias=tuple(sorted(p.logit_bias.items())),
    )


def constraint(request: pb.GenerateRequest) -> Constraint | None:
    """The request's output constraint (the engine checks and compiles it); `json_object: false` is free text."""
    kind = request.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not request.json_object):
        return None
    if kind == "json_object":
        return Constraint(kind)
    if kind == "choice":
        return Constraint(kind, tuple(request.choice.values))
    return Constraint(kind, getattr(request, kind))


def chat_messages(messages: pb.ChatMessages) -> list[ChatMessage]:
    """The conversation's turns; content given as parts is joined by newlines."""
    return [_chat_message(i, m) for i, m in enumerate(messages.messages)]


def _chat_message(index: int, message: pb.ChatMessage) -> ChatMessage:
    content = message.content
    if message.content_parts:
        if content:
            raise InvalidRequestError(f"messages[{index}].content_parts", "set content or content_parts, not both")
        texts = []
        for j, part in enumerate(message.content_parts):
            if part.WhichOneof("part") != "text":
                raise InvalidRequestError(f"messages[{index}].content_parts[{j}]", "set the part's text")
            texts.append(part.text)
        content = "\n".join(texts)
    calls = tuple(ToolCallRef(c.id, c.name, c.arguments) for c in message.tool_calls)
    return ChatMessage(message.role, content, calls, message.tool_call_id, message.name)


_TOOL_CHOICE_MODES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: None,
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def tools(request: pb.GenerateRequest) -> ToolRequest | None:
    """The request's checked tools and tool choice; None without tools."""
    raw = [RawTool(t.name, t.description, t.parameters) for t in request.tools]
    choice = request.tool_choice
    kind = choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if kind == "mode" and choice.mode not in _TOOL_CHOICE_MODES:
        raise InvalidRequestError("tool_choice.mode", f"unknown mode {choice.mode}")
    mode = _TOOL_CHOICE_MODES[choice.mode] if kind == "mode" else None
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return tool_request(raw, mode, choice.function if kind == "function" else None, parallel)


def tool_call_deltas(deltas: Sequence[ToolCallDelta]) -> list[pb.ToolCallDelta]:
    return [pb.ToolCallDelta(index=d.index, id=d.id or "", name=d.name or "", arguments=d.arguments) for d in deltas]


def tool_calls(calls: Sequence[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments, index=c.index) for c in calls]


def token_logprobs(items: Sequence[TokenLogprob], tokenizer: Tokenizer) -> list[pb.TokenLogprob]:
    """Logprobs with each token's text and bytes."""
    result = []
    for item in items:
        message = pb.TokenLogprob(
            token_id=item.token_id,
            token=tokenizer.token_text(item.token_id),
            token_bytes=tokenizer.token_bytes(item.token_id),
            top_logprobs=[
                pb.TopLogprob(
                    token_id=top.token_id,
                    token=tokenizer.token_text(top.token_id),
                    token_bytes=tokenizer.token_bytes(top.token_id),
                    logprob=top.logprob,
                )
                for top in item.top
            ],
        )
        if item.logprob is not None:
            message.logprob = item.logprob
        result.append(message)
    return result


def generate_response(
    output: GenerationOutput,
    *,
    request_id: str,
    model: str,
    tokenizer: Tokenizer,
    prompt_token_ids: list[int] | None,
    parsed: ChoiceDelta | None = None,
    calls: Sequence[ToolCall] = (),
) -> pb.GenerateResponse:
    """One stream message from one engine output; `prompt_token_ids` is given on a choice's first message.
    With `parsed` (the choice's output parser ran), its answer text, reasoning and call deltas replace the raw
    text; `calls` are the choice's complete calls, given on its last message."""
    response = pb.GenerateResponse(
        request_id=request_id,
        index=output.index,
        text=output.text if parsed is None else parsed.content,
        token_ids=output.token_ids,
        model=model,
    )
    if parsed is not None:
        response.reasoning_text = parsed.reasoning
        response.tool_call_deltas.extend(tool_call_deltas(parsed.tool_calls))
    response.tool_calls.extend(tool_calls(calls))
    if output.logprobs:
        response.logprobs.extend(token_logprobs(output.logprobs, tokenizer))
    if prompt_token_ids is not None:
        response.prompt_token_ids.extend(prompt_token_ids)
    if output.prompt_logprobs:
        response.prompt_logprobs.extend(token_logprobs(output.prompt_logprobs, tokenizer))
    if output.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[output.finish_reason]
        if calls and output.finish_reason in (FinishReason.STOP, FinishReason.STOP_SEQUENCE):
            response.finish_reason = pb.FINISH_REASON_TOOL_CALLS
        response.stop_reason = output.stop_reason or ""
    if output.usage is not None:
        usage = output.usage
        response.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                total_tokens=usage.prompt_tokens + usage.completion_tokens,
            )
        )
    return response
