"""POST /v1/responses, OpenAI's Responses API over one Generate call, and GET / DELETE of the responses this
gateway stored (see response_store for why a stored response lives in one gateway process only)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc
from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway import sse
from weir_gateway.errors import ApiError, bad_request, from_rpc_error
from weir_gateway.generation import Item, stream_generate
from weir_gateway.response_store import RESPONSE_STORE, ResponseStore, StoredResponse
from weir_gateway.responses_input import instructions_turn, parse_input
from weir_gateway.responses_output import Event, ResponseBuilder, new_id
from weir_gateway.responses_params import apply_text_format, apply_tools
from weir_gateway.responses_schema import RESPONSES_REQUEST_SCHEMA, responses_request
from weir_gateway.sampling import constraint_params
from weir_gateway.schema import Body
from weir_gateway.state import CONFIG, POOL, REQUEST_ID, call_context
from weir_gateway.validation import Fields, read_json

__all__ = ["RESPONSES_REQUEST_SCHEMA", "create_response", "delete_response", "responses_request", "retrieve_response"]

logger = logging.getLogger(__name__)


async def create_response(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses, streaming or not; the finished response is stored unless `store` is false."""
    config, pool, store = request.app[CONFIG], request.app[POOL], request.app[RESPONSE_STORE]
    body = responses_request(config).read(Fields(await read_json(request)))
    model = body.value("model", "")
    previous = _previous_response(body, store)
    history = previous.conversation if previous is not None else ()
    conversation = (*history, *parse_input(body, previous.call_names() if previous else {}, config.strict))
    if not conversation:
        raise body.error("input", "required: a string or an array of input items")

    context_length = pool.context_length(model, pb.MODEL_TASK_GENERATE)
    # No default cap of its own: generate up to the context length, as OpenAI does.
    max_tokens = body.value("max_output_tokens") or min(config.max_tokens, context_length or config.max_tokens)
    params = pb.SamplingParams(n=1, max_tokens=max_tokens, temperature=body.value("temperature"),
                               top_p=body.value("top_p"))  # fmt: skip
    message = pb.GenerateRequest(model=model, request_id=request[REQUEST_ID], sampling_params=params)
    message.messages.messages.extend([*instructions_turn(body), *conversation])
    message.messages.add_generation_prompt = True
    tools, tool_choice = apply_tools(body, message)
    text, constraint_source = apply_text_format(body, message)
    keep = body.value("store", True)
    builder = ResponseBuilder(new_id("resp"), model, _settings(body, tools, tool_choice, text))

    def save() -> None:
        if keep:
            store.put(builder.response_id, builder.body(), (*conversation, builder.output_turn()))

    renamed = functools.partial(body_param, constraint_source=constraint_source)
    stream = stream_generate(pool, model, [message], call_context(request), renamed_params=renamed)
    return await _answer(request, stream, builder, save, streaming=body.value("stream", False))


# The server names fields of weir.v1; these are the Responses body's names for them where they differ. A turn's
# index does not tell which input item it came from (calls fold into one turn, history comes first), so a
# complaint about a turn names `input` as a whole.
_SERVER_NAMES = {"max_tokens": "max_output_tokens", "messages": "input", "tool_choice": "tool_choice"}


def body_param(server_param: str, constraint_source: str | None) -> str | None:
    """The body field a server error names (None when it is the server's name)."""
    renamed = constraint_params(constraint_source).get(server_param)
    if renamed is not None:
        return renamed
    renamed = _SERVER_NAMES.get(server_param.split(".")[0].split("[")[0])
    return renamed if renamed != server_param else None


def _settings(body: Body, tools: list[dict[str, Any]], tool_choice: Any, text: dict[str, Any]) -> dict[str, Any]:
    """The request fields the response object repeats, with OpenAI's defaults where the body left them out."""
    reasoning = body.raw("reasoning")  # accepted and ignored, yet repeated as OpenAI does
    return {
        "background": False,
        "instructions": body.value("instructions"),
        "max_output_tokens": body.value("max_output_tokens"),
        "metadata": body.value("metadata", {}),
        "parallel_tool_calls": body.value("parallel_tool_calls", True),
        "previous_response_id": body.value("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")} if reasoning else None,
        "store": body.value("store", True),
        "temperature": body.value("temperature", 1.0),
        "text": text,
        "tool_choice": tool_choice,
        "tools": tools,
        "top_p": body.value("top_p", 1.0),
        "truncation": "disabled",
        "user": body.raw("user"),
    }


def _previous_response(body: Body, store: ResponseStore) -> StoredResponse | None:
    """The stored response `previous_response_id` continues; unknown or expired is a 400 naming it, as OpenAI."""
    previous_id = body.value("previous_response_id")
    if previous_id is None:
        return None
    previous = store.get(previous_id)
    if previous is None:
        raise ApiError(400, f"Previous response with id '{previous_id}' not found.", param="previous_response_id",
                       code="previous_response_not_found")  # fmt: skip
    return previous


async def _answer(
    request: web.Request,
    stream: AsyncGenerator[Item, None],
    builder: ResponseBuilder,
    save: Callable[[], None],
    *,
    streaming: bool,
) -> web.StreamResponse:
    """One JSON response object, or its events once the first output arrived (earlier errors keep their HTTP
    status; later ones become an `error` event that ends the stream). Stored before the last event goes out,
    so a client that reads `response.completed` can GET it at once."""
    async with contextlib.aclosing(stream):
        if not streaming:
            async for _, message in stream:
                builder.add(message)
            builder.finish()
            save()
            return web.json_response(builder.body(), dumps=sse.dumps)
        try:
            _, first = await anext(stream)
        except StopAsyncIteration:
            raise ApiError(502, "the backend ended the stream without output") from None
        builder.observe_model(first)
        response = await sse.open_stream(request)
        try:
            await _send(response, builder.start())
            await _send(response, builder.add(first))
            async for _, message in stream:
                await _send(response, builder.add(message))
            last = builder.finish()
            save()
            await _send(response, last)
        except (grpc.aio.AioRpcError, ApiError) as e:
            error = from_rpc_error(e) if isinstance(e, grpc.aio.AioRpcError) else e
            logger.warning("stream %s failed after it started: %s", builder.response_id, error.message)
            await _send(response, [builder.error_event(error)])
        except ConnectionResetError:
            logger.info("client of %s went away; its generation was cancelled", builder.response_id)
            return response
        await response.write_eof()
        return response


async def _send(response: web.StreamResponse, events: list[Event]) -> None:
    """Named server-sent events (`event:` then `data:`), as the Responses API streams them; no [DONE] ends it."""
    if events:
        await response.write("".join(f"event: {e['type']}\ndata: {sse.dumps(e)}\n\n" for e in events).encode())


def _stored(request: web.Request) -> tuple[str, StoredResponse]:
    response_id = request.match_info["response_id"]
    entry = request.app[RESPONSE_STORE].get(response_id)
    if entry is None:
        raise ApiError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return response_id, entry


async def retrieve_response(request: web.Request) -> web.Response:
    """GET /v1/responses/{response_id}: a stored response object."""
    if request.query.get("stream", "false").lower() not in ("false", "0"):
        raise bad_request("stream", "stream: replaying a stored response as events is not supported by Weir yet")
    _, entry = _stored(request)
    return web.json_response(entry.body, dumps=sse.dumps)


async def delete_response(request: web.Request) -> web.Response:
    """DELETE /v1/responses/{response_id}: forget a stored response (later reads and continuations get 404/400)."""
    response_id, _ = _stored(request)
    request.app[RESPONSE_STORE].delete(response_id)
    body: dict[str, Any] = {"id": response_id, "object": "response", "deleted": True}
    return web.json_response(body)
