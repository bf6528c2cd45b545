"""POST /tokenize and POST /detokenize (vLLM's shapes) over the Tokenize and Detokenize RPCs."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from weir.v1 import inference_pb2 as pb
from weir_gateway.backends import BackendPool
from weir_gateway.generation import CallContext
from weir_gateway.state import POOL, call_context
from weir_gateway.validation import Fields, read_json

GENERATE = pb.MODEL_TASK_GENERATE
UNSUPPORTED = {"messages": "tokenizing chat messages", "chat_template": "custom chat templates"}


async def tokenize(request: web.Request) -> web.Response:
    """Token ids (and optionally token strings) of `prompt`."""
    fields = Fields(await read_json(request))
    fields.reject_unknown(frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"}), UNSUPPORTED)
    model = fields.string("model", "") or ""
    prompt = fields.string("prompt")
    if prompt is None:
        raise fields.error("prompt", "required")
    message = pb.TokenizeRequest(model=model, texts=[prompt])
    message.add_special_tokens = bool(fields.boolean("add_special_tokens", True))
    return_strs = fields.boolean("return_token_strs", False)
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
    fields = Fields(await read_json(request))
    fields.reject_unknown(frozenset({"model", "tokens"}))
    model = fields.string("model", "") or ""
    if not fields.present("tokens"):
        raise fields.error("tokens", "required")
    tokens = fields.token_ids("tokens")
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
