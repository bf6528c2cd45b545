"""POST /v1/embeddings over the Embed RPC; vectors as float arrays or base64 little-endian float32."""

from __future__ import annotations

import base64
import functools
import struct
from typing import Any

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.schema import Field, ObjectSchema, Use, integer, string, texts_or_token_ids
from weir_gateway.sse import dumps
from weir_gateway.state import CONFIG, POOL, call_context
from weir_gateway.telemetry import embeddings_span
from weir_gateway.validation import UINT32_MAX, Fields, is_token_id, read_json


@functools.lru_cache(maxsize=16)
def embedding_request(config: GatewayConfig) -> ObjectSchema:
    """The embeddings request body's fields, with the limits of `config`."""
    return ObjectSchema(
        (
            string("model", doc="model id; empty or absent means the server's default embedding model"),
            Field("input", texts_or_token_ids(config.max_embedding_inputs),
                  functools.partial(parse_input, config=config)),
            string("encoding_format", ("float", "base64")),
            integer("dimensions", 1, UINT32_MAX, doc="keep the first n dimensions (renormalized)"),
            string("user", use=Use.IGNORED, doc="end-user id"),
        ),
        required=("input",),
        open=True,
        strict=config.strict,
    )  # fmt: skip


def parse_input(fields: Fields, name: str = "input", *, config: GatewayConfig) -> pb.EmbedRequest:
    """`input` (a string, strings, token ids or lists of token ids) as a request's inputs."""
    value = fields.raw(name)
    if value is None:
        raise fields.error(name, "required")
    if isinstance(value, str):
        texts: list[str] | None = [value]
    elif isinstance(value, list) and value and all(isinstance(s, str) for s in value):
        texts = value
    elif isinstance(value, list) and value and all(is_token_id(t) for t in value):
        texts, token_lists = None, [value]
    elif isinstance(value, list) and value and all(isinstance(t, list) for t in value):
        texts, token_lists = None, [fields.token_ids(name, t) for t in value]
    else:
        raise fields.error(
            name, "expected a non-empty string, array of strings, array of token ids or array of token-id arrays"
        )
    inputs: list[Any] = texts if texts is not None else token_lists
    if len(inputs) > config.max_embedding_inputs:
        raise fields.error(name, f"at most {config.max_embedding_inputs} inputs per request, got {len(inputs)}")
    if any(len(item) == 0 for item in inputs):
        raise fields.error(name, "inputs must not be empty")
    message = pb.EmbedRequest()
    if texts is not None:
        message.texts.extend(texts)
    else:
        message.token_ids.extend(pb.TokenIds(ids=ids) for ids in token_lists)
    return message


def encode_base64(values: Any) -> str:
    """A vector as OpenAI sends base64 embeddings: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


async def create_embeddings(request: web.Request) -> web.Response:
    """OpenAI /v1/embeddings."""
    config = request.app[CONFIG]
    body = embedding_request(config).read(Fields(await read_json(request)))
    model = body.value("model") or ""
    message: pb.EmbedRequest = body.value("input")
    message.model = model
    encoding = body.value("encoding_format", "float")
    message.dimensions = body.value("dimensions", 0)

    ctx = call_context(request)
    with embeddings_span(model) as traced:
        reply = await request.app[POOL].unary(
            model, pb.MODEL_TASK_EMBED, lambda stub: stub.Embed(message, metadata=ctx.metadata, timeout=ctx.timeout_s)
        )
        traced(reply)
    data = [
        {
            "object": "embedding",
            "index": e.index,
            "embedding": encode_base64(e.values) if encoding == "base64" else list(e.values),
        }
        for e in reply.embeddings
    ]
    usage = {"prompt_tokens": reply.usage.prompt_tokens, "total_tokens": reply.usage.prompt_tokens}
    answer = {"object": "list", "data": data, "model": reply.model or model, "usage": usage}
    return web.json_response(answer, dumps=dumps)
