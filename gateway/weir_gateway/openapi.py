"""The OpenAPI 3.0 description of the gateway's routes, served at /openapi.json: request bodies come from the tables
the handlers check them with (weir_gateway.schema), limits from the config."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from weir_gateway.chat import chat_request
from weir_gateway.completions import completion_request
from weir_gateway.config import GatewayConfig
from weir_gateway.embeddings import embedding_request
from weir_gateway.lora import load_lora_request, unload_lora_request
from weir_gateway.responses import responses_request
from weir_gateway.schema import ObjectSchema
from weir_gateway.state import CONFIG, gateway_version
from weir_gateway.tokenization import detokenize_request, tokenize_request

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


def request_schemas(config: GatewayConfig) -> dict[str, ObjectSchema]:
    """Every request body the gateway reads, by component name: the tables the handlers check bodies with."""
    return {
        "CompletionRequest": completion_request(config),
        "ChatCompletionRequest": chat_request(config),
        "ResponseRequest": responses_request(config),
        "EmbeddingRequest": embedding_request(config),
        "TokenizeRequest": tokenize_request(config.strict),
        "DetokenizeRequest": detokenize_request(config.strict),
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


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


def _text_ok(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


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
        "/v1/responses": _post("Create a response (the Responses API)", "ResponseRequest", {
            "description": "the response; with `stream: true`, its server-sent events (response.created ... "
                           "response.completed)",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": SSE_EVENT}},
        }),
        "/v1/responses/{response_id}": {
            method: {
                "summary": summary,
                "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses(_json_ok(ok), unauthenticated),
            }
            for method, summary, ok in (("get", "A stored response", "the response"),
                                        ("delete", "Delete a stored response", "the deletion"))
        },
        "/v1/embeddings": _post("Embeddings", "EmbeddingRequest", _json_ok("one vector per input")),
        "/tokenize": _post("Tokenize a prompt", "TokenizeRequest", _json_ok("token ids")),
        "/detokenize": _post("Text of token ids", "DetokenizeRequest", _json_ok("the text")),
        "/v1/load_lora_adapter": _post("Load a LoRA adapter on every backend", "LoadLoRAAdapterRequest",
                                       _text_ok("vLLM's success text")),
        "/v1/unload_lora_adapter": _post("Unload a LoRA adapter from every backend", "UnloadLoRAAdapterRequest",
                                         _text_ok("vLLM's success text")),
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
            "schemas": {name: schema.openapi() for name, schema in request_schemas(config).items()}
            | {"Error": error, "GenerationResponse": generation_response}
            | {
                "LoadLoRAAdapterRequest": load_lora_request(config.strict).openapi(),
                "UnloadLoRAAdapterRequest": unload_lora_request(config.strict).openapi(),
            },
        },
    }
    if config.api_keys:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: this gateway's OpenAPI description (no key needed)."""
    return web.json_response(build_openapi(request.app[CONFIG]))
