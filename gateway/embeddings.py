"""POST /v1/embeddings over the Embed RPC; vectors as float arrays or base64 little-endian float32."""

from __future__ import annotations

import base64
import struct
from typing import Any

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.sse import dumps
from weir_gateway.state import CONFIG, POOL, call_context
from weir_gateway.validation import UINT32_MAX, Fields, is_token_id, read_json

KNOWN_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def parse_input(fields: Fields, config: GatewayConfig, message: pb.EmbedRequest) -> None:
    """Put `input` (a string, strings, token ids or lists of token ids) into the request."""
    value = fields.raw("input")
    if value is None:
        raise fields.error("input", "required")
    if isinstance(value, str):
        texts: list[str] | None = [value]
    elif isinstance(value, list) and value and all(isinstance(s, str) for s in value):
        texts = value
    elif isinstance(value, list) and value and all(is_token_id(t) for t in value):
        texts, token_lists = None, [value]
    elif isinstance(value, list) and value and all(isinstance(t, list) for t in value):
        texts, token_lists = None, [fields.token_ids("input", t) for t in value]
    else:
        raise fields.error(
            "input", "expected a non-empty string, array of strings, array of token ids or array of token-id arrays"
        )
    inputs: list[Any] = texts if texts is not None else token_lists
    if len(inputs) > config.max_embedding_inputs:
        raise fields.error("input", f"at most {config.max_embedding_inputs} inputs per request, got {len(inputs)}")
    if any(len(item) == 0 for item in inputs):
        raise fields.error("input", "inputs must not be empty")
    if texts is not None:
        message.texts.extend(texts)
    else:
        message.token_ids.extend(pb.TokenIds(ids=ids) for ids in token_lists)


def encode_base64(values: Any) -> str:
    """A vector as OpenAI sends base64 embeddings: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


async def create_embeddings(request: web.Request) -> web.Response:
    """OpenAI /v1/embeddings."""
    config = request.app[CONFIG]
    fields = Fields(await read_json(request))
    fields.reject_unknown(KNOWN_FIELDS)
    model = fields.string("model", "") or ""
    message = pb.EmbedRequest(model=model)
    parse_input(fields, config, message)
    encoding = fields.string("encoding_format", "float", choices=("float", "base64"))
    message.dimensions = fields.integer("dimensions", 0, lo=1, hi=UINT32_MAX) or 0
    fields.string("user")

    ctx = call_context(request)
    reply = await request.app[POOL].unary(
        model, pb.MODEL_TASK_EMBED, lambda stub: stub.Embed(message, metadata=ctx.metadata, timeout=ctx.timeout_s)
    )
    data = [
        {
            "object": "embedding",
            "index": e.index,
            "embedding": encode_base64(e.values) if encoding == "base64" else list(e.values),
        }
        for e in reply.embeddings
    ]
    usage = {"prompt_tokens": reply.usage.prompt_tokens, "total_tokens": reply.usage.prompt_tokens}
    body = {"object": "list", "data": data, "model": reply.model or model, "usage": usage}
    return web.json_response(body, dumps=dumps)
