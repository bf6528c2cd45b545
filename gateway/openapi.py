"""The OpenAPI 3.0 description of the gateway's routes, served at /openapi.json; limits come from the config."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from weir_gateway.config import GatewayConfig
from weir_gateway.state import CONFIG, gateway_version

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
# One server-sent event: `data` holds a JSON chunk (or an error object), the last one `[DONE]`.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
JSON_ERROR_STATUSES = {
    "400": "invalid request (the error names the field in `param`)",
    "401": "missing or wrong API key",
    "404": "unknown model or route",
    "413": "request body too large",
    "415": "body is not JSON",
    "429": "the server's queue is full; retry after the Retry-After header",
    "503": "no backend is serving, or the gateway is shutting down",
    "504": "the request's deadline passed",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _number(lo: float, hi: float, *, exclusive_lo: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number", "minimum": lo, "maximum": hi, "nullable": True}
    if exclusive_lo:
        schema["exclusiveMinimum"] = True
    return schema


def _sampling(config: GatewayConfig) -> dict[str, Any]:
    """Fields chat and completions share."""
    max_tokens = {"type": "integer", "minimum": 1, "maximum": config.max_tokens, "nullable": True}
    return {
        "model": {"type": "string"},
        "max_tokens": max_tokens,
        "max_completion_tokens": max_tokens,
        "min_tokens": {"type": "integer", "minimum": 0, "maximum": config.max_tokens},
        "temperature": _number(0, 2),
        "top_p": _number(0, 1, exclusive_lo=True),
        "top_k": {"type": "integer", "minimum": -1, "maximum": 2**31 - 1},
        "min_p": _number(0, 1),
        "repetition_penalty": _number(0, 2, exclusive_lo=True),
        "presence_penalty": _number(-2, 2),
        "frequency_penalty": _number(-2, 2),
        "n": {"type": "integer", "minimum": 1, "maximum": config.max_n},
        "seed": INT64 | {"nullable": True},
        "stop": {
            "nullable": True,
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
            ],
        },
        "stop_token_ids": {"type": "array", "items": TOKEN_ID, "maxItems": 256},
        "ignore_eos": {"type": "boolean"},
        "skip_special_tokens": {"type": "boolean"},
        "include_stop_str_in_output": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
            "additionalProperties": False,
        },
        "user": {"type": "string"},
    }


def _request_schemas(config: GatewayConfig) -> dict[str, Any]:
    token_ids = {"type": "array", "items": TOKEN_ID, "minItems": 1}
    text_part = {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
        "required": ["type", "text"],
        "additionalProperties": False,
    }
    message = {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": {
                "oneOf": [{"type": "string"}, {"type": "array", "items": text_part, "minItems": 1}],
            },
        },
        "required": ["role", "content"],
        "additionalProperties": False,
    }
    completion = _sampling(config) | {
        "prompt": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                 "maxItems": config.max_prompts},
                token_ids,
                {"type": "array", "items": token_ids, "minItems": 1, "maxItems": config.max_prompts},
            ]
        },
        "echo": {"type": "boolean"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "nullable": True},
        "best_of": {"type": "integer", "minimum": 1, "maximum": 1},
    }  # fmt: skip
    chat = _sampling(config) | {
        "messages": {"type": "array", "items": message, "minItems": 1},
        "logprobs": {"type": "boolean", "nullable": True},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "nullable": True},
        "add_generation_prompt": {"type": "boolean"},
    }
    inputs = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
             "maxItems": config.max_embedding_inputs},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1, "maxItems": config.max_embedding_inputs},
        ]
    }  # fmt: skip
    return {
        "CompletionRequest": _object(completion, ["prompt"]),
        "ChatCompletionRequest": _object(chat, ["messages"]),
        "EmbeddingRequest": _object(
            {
                "model": {"type": "string"},
                "input": inputs,
                "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                "dimensions": {"type": "integer", "minimum": 1, "maximum": 2**32 - 1},
                "user": {"type": "string"},
            },
            ["input"],
        ),
        "TokenizeRequest": _object(
            {
                "model": {"type": "string"},
                "prompt": {"type": "string"},
                "add_special_tokens": {"type": "boolean"},
                "return_token_strs": {"type": "boolean"},
            },
            ["prompt"],
        ),
        "DetokenizeRequest": _object({"model": {"type": "string"}, "tokens": {"type": "array", "items": TOKEN_ID}},
                                     ["tokens"]),  # fmt: skip
    }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """A request body object; optional fields may be null, which the gateway reads as absent (as OpenAI does)."""
    properties = {
        name: schema if name in required else schema | {"nullable": True} for name, schema in properties.items()
    }
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _responses(ok: dict[str, Any], errors: tuple[str, ...] = tuple(JSON_ERROR_STATUSES)) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    for status in errors:
        responses[status] = {
            "description": JSON_ERROR_STATUSES[status],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    return responses


def _json_ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _generation_ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": f"{description}; with `stream: true`, server-sent events ending with `data: [DONE]`",
        "content": {"application/json": {"schema": _ref(schema)}, "text/event-stream": {"schema": SSE_EVENT}},
    }


def _post(summary: str, request: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": _responses(ok),
        }
    }


def build_openapi(config: GatewayConfig) -> dict[str, Any]:
    """The OpenAPI document of a gateway with `config` (its limits become the schemas' bounds)."""
    generation_response = {
        "type": "object",
        "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "choices": {"type": "array"}},
        "required": ["id", "object", "choices"],
    }
    error = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string", "nullable": True},
                },
                "required": ["message", "type"],
            }
        },
        "required": ["error"],
    }
    unauthenticated = ("401", "404", "503")
    paths = {
        "/v1/completions": _post("Text completion", "CompletionRequest",
                                 _generation_ok("the completion", "GenerationResponse")),
        "/v1/chat/completions": _post("Chat completion", "ChatCompletionRequest",
                                      _generation_ok("the chat completion", "GenerationResponse")),
        "/v1/embeddings": _post("Embeddings", "EmbeddingRequest", _json_ok("one vector per input")),
        "/tokenize": _post("Tokenize a prompt", "TokenizeRequest", _json_ok("token ids")),
        "/detokenize": _post("Text of token ids", "DetokenizeRequest", _json_ok("the text")),
        "/v1/models": {"get": {"summary": "Models served", "responses": _responses(_json_ok("model list"),
                                                                                   unauthenticated)}},
        "/v1/models/{model_id}": {
            "get": {
                "summary": "One model",
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses(_json_ok("the model"), unauthenticated),
            }
        },
        "/health": {"get": {"summary": "200 while a backend is serving", "security": [],
                            "responses": _responses(_json_ok("serving"), ("503",))}},
        "/version": {"get": {"summary": "Gateway version", "security": [],
                             "responses": _responses(_json_ok("version"), ())}},
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": _responses(_json_ok("OpenAPI 3.0 document"), ())}},
    }  # fmt: skip
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "Weir OpenAI-compatible gateway", "version": gateway_version()},
        "paths": paths,
        "components": {
            "schemas": _request_schemas(config) | {"Error": error, "GenerationResponse": generation_response},
        },
    }
    if config.api_keys:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: this gateway's OpenAPI description (no key needed)."""
    return web.json_response(build_openapi(request.app[CONFIG]))
