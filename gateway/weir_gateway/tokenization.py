"""POST /tokenize and POST /detokenize (vLLM's shapes) over the Tokenize and Detokenize RPCs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.backends import BackendPool
from weir_gateway.generation import CallContext
from weir_gateway.schema import TOKEN_ID_SCHEMA, Field, ObjectSchema, boolean, refused, string
from weir_gateway.state import CONFIG, POOL, call_context
from weir_gateway.validation import Fields, read_json

GENERATE = pb.MODEL_TASK_GENERATE


@functools.lru_cache(maxsize=4)
def tokenize_request(strict: bool) -> ObjectSchema:
    """vLLM's /tokenize body (text prompts only)."""
    return ObjectSchema(
        (
            string("model"),
            string("prompt"),
            boolean("add_special_tokens", doc="default true"),
            boolean("return_token_strs"),
            refused("messages", "tokenizing chat messages"),
            refused("chat_template", "custom chat templates"),
        ),
        required=("prompt",),
        open=True,
        strict=strict,
    )


@functools.lru_cache(maxsize=4)
def detokenize_request(strict: bool) -> ObjectSchema:
    """vLLM's /detokenize body."""
    tokens = Field("tokens", {"type": "array", "items": TOKEN_ID_SCHEMA}, lambda f, n: f.token_ids(n))
    return ObjectSchema((string("model"), tokens), required=("tokens",), open=True, strict=strict)


async def tokenize(request: web.Request) -> web.Response:
    """Token ids (and optionally token strings) of `prompt`."""
    body = tokenize_request(request.app[CONFIG].strict).read(Fields(await read_json(request)))
    model = body.value("model") or ""
    message = pb.TokenizeRequest(model=model, texts=[body.value("prompt")])
    message.add_special_tokens = body.value("add_special_tokens", True)
    return_strs = body.value("return_token_strs", False)
    ctx = call_context(request)
    reply = await request.app[POOL].unary(
        model, GENERATE, lambda stub: stub.Tokenize(message, metadata=ctx.metadata, timeout=ctx.timeout_s)
    )
    result = reply.results[0]
    return web.json_response(
        {
            "count": len(result.token_ids),
            "max_model_len": reply.max_model_len,
            "tokens": list(result.token_ids),
            "token_strs": list(result.tokens) if return_strs else None,
        }
    )


async def detokenize(request: web.Request) -> web.Response:
    """The text of the token ids `tokens`."""
    body = detokenize_request(request.app[CONFIG].strict).read(Fields(await read_json(request)))
    model = body.value("model") or ""
    tokens = body.value("tokens")
    texts = await detokenize_texts(request.app[POOL], model, [tokens], call_context(request))
    return web.json_response({"prompt": texts[0]})


async def detokenize_texts(
    pool: BackendPool, model: str, sequences: Sequence[Sequence[int]], ctx: CallContext, skip_special: bool = True
) -> list[str]:
    """Texts of token id sequences, from the backend's tokenizer."""
    message = pb.DetokenizeRequest(
        model=model, sequences=[pb.TokenIds(ids=ids) for ids in sequences], skip_special_tokens=skip_special
    )
    reply = await pool.unary(
        model, GENERATE, lambda stub: stub.Detokenize(message, metadata=ctx.metadata, timeout=ctx.timeout_s)
    )
    return list(reply.texts)
