"""The aiohttp application: routes in one table, the backend pool as a cleanup context, middlewares for
request ids, errors, CORS and auth."""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from weir_gateway.backends import BackendPool
from weir_gateway.chat import create_chat_completion
from weir_gateway.completions import create_completion
from weir_gateway.config import GatewayConfig
from weir_gateway.drain import drain_middleware, install_drain
from weir_gateway.embeddings import create_embeddings
from weir_gateway.errors import ApiError, from_rpc_error
from weir_gateway.logging_setup import access_log_middleware
from weir_gateway.lora import load_lora_adapter, unload_lora_adapter
from weir_gateway.metrics import install_metrics, metrics_middleware, metrics_open
from weir_gateway.models import list_models, retrieve_model
from weir_gateway.openapi import openapi_json
from weir_gateway.ratelimit import install_rate_limits, rate_limit_middleware
from weir_gateway.response_store import install_response_store
from weir_gateway.responses import create_response, delete_response, retrieve_response
from weir_gateway.sse import dumps
from weir_gateway.state import CONFIG, POOL, REQUEST_ID, gateway_version
from weir_gateway.telemetry import TRACER_PROVIDER, client_interceptors, tracing_middlewares
from weir_gateway.tokenization import detokenize, tokenize

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # what gRPC metadata and log lines can carry safely
OPEN_PATHS = frozenset({"/health", "/version", "/openapi.json"})  # answered without an API key


async def health(request: web.Request) -> web.Response:
    """200 while at least one backend is SERVING, else 503."""
    backends = {b.address: "SERVING" if b.available else "NOT_SERVING" for b in request.app[POOL].backends}
    ok = "SERVING" in backends.values()
    return web.json_response({"status": "ok" if ok else "unavailable", "backends": backends}, status=200 if ok else 503)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": gateway_version()})


ROUTES = [
    web.post("/v1/completions", create_completion),
    web.post("/v1/chat/completions", create_chat_completion),
    web.post("/v1/responses", create_response),
    web.get("/v1/responses/{response_id}", retrieve_response),
    web.delete("/v1/responses/{response_id}", delete_response),
    web.post("/v1/embeddings", create_embeddings),
    web.get("/v1/models", list_models),
    web.get("/v1/models/{model_id:.+}", retrieve_model),
    web.post("/v1/load_lora_adapter", load_lora_adapter),
    web.post("/v1/unload_lora_adapter", unload_lora_adapter),
    web.post("/tokenize", tokenize),
    web.post("/detokenize", detokenize),
    web.get("/health", health),
    web.get("/version", version),
    web.get("/openapi.json", openapi_json),
]


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI error body with its HTTP status (and Retry-After when the backend gave one)."""
    headers = dict(headers or {})
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return web.json_response(error.body(), status=error.status, headers=headers, dumps=dumps)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Honour the client's X-Request-Id when it is safe to forward, else assign one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request[REQUEST_ID] = given if VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI error JSON with the right status."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except grpc.aio.AioRpcError as e:
        error = from_rpc_error(e, request.path)
        logger.info("request %s: backend answered %s: %s", request[REQUEST_ID], e.code().name, error.message)
        return error_response(error)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if isinstance(e, web.HTTPRequestEntityTooLarge):
            message = f"request body too large (limit {request.app[CONFIG].max_body_bytes} bytes)"
        keep = {k: v for k, v in e.headers.items() if k in (hdrs.ALLOW,)}
        return error_response(ApiError(e.status, message), keep)
    except ConnectionResetError:
        raise
    except Exception:
        logger.exception("request %s failed", request[REQUEST_ID])
        return error_response(ApiError(500, "internal gateway error; see the gateway log"))


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights for allowed origins (other responses get their headers in `_on_prepare`)."""
    origin = request.headers.get(hdrs.ORIGIN)
    if request.method == hdrs.METH_OPTIONS and origin and _origin_allowed(request, origin):
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, POST, DELETE, OPTIONS",
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: request.headers.get(
                    hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "Authorization, Content-Type"
                ),
                hdrs.ACCESS_CONTROL_MAX_AGE: "600",
            },
        )
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require `Authorization: Bearer KEY` with one of the configured keys (compared in constant time)."""
    keys = request.app[CONFIG].api_keys
    if keys and request.path not in OPEN_PATHS and not metrics_open(request):
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        matched = False
        for key in keys:  # compare against every key so timing says nothing about which one is close
            matched |= hmac.compare_digest(token.strip().encode(), key.encode())
        if scheme.lower() != "bearer" or not matched:
            message = "Incorrect or missing API key; send `Authorization: Bearer <key>`"
            raise ApiError(401, message, code="invalid_api_key")
    return await handler(request)


def _origin_allowed(request: web.Request, origin: str) -> bool:
    allowed = request.app[CONFIG].cors_origins
    return "*" in allowed or origin in allowed


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streams included: the request id, and CORS for allowed origins."""
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    origin = request.headers.get(hdrs.ORIGIN)
    if origin and _origin_allowed(request, origin):
        allow_any = "*" in request.app[CONFIG].cors_origins
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*" if allow_any else origin
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = REQUEST_ID_HEADER
        if not allow_any:
            response.headers.add(hdrs.VARY, "Origin")


async def _backend_pool(app: web.Application) -> AsyncIterator[None]:
    pool = BackendPool(app[CONFIG], interceptors=client_interceptors(app[TRACER_PROVIDER]))
    await pool.start()
    app[POOL] = pool
    yield
    await pool.close()


def create_app(config: GatewayConfig, tracer_provider: Any = None) -> web.Application:
    """The gateway application for `config` (traced with `tracer_provider`, an OpenTelemetry TracerProvider, when
    given); run it with handler_cancellation=True so a client that disconnects cancels its backend calls at once."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            *tracing_middlewares(tracer_provider),  # first: the request's span covers everything below
            drain_middleware, request_id_middleware, access_log_middleware(REQUEST_ID), metrics_middleware,
            error_middleware, cors_middleware, auth_middleware, rate_limit_middleware,
        ],
    )  # fmt: skip
    app[CONFIG] = config
    app[TRACER_PROVIDER] = tracer_provider
    install_metrics(app, lambda: app[POOL].backends if POOL in app else [])
    install_drain(app)
    install_response_store(app)
    install_rate_limits(app, config)
    app.cleanup_ctx.append(_backend_pool)
    app.on_response_prepare.append(_on_prepare)
    app.add_routes(ROUTES)
    return app
