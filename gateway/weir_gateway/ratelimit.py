"""Per-API-key rate limits: a token bucket of requests per minute and one of tokens per minute for each key; a
request over either is answered 429 with Retry-After before it reaches a backend."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from weir_gateway.config import GatewayConfig
from weir_gateway.errors import ApiError
from weir_gateway.http_limits import read_body

BYTES_PER_TOKEN = 4  # the prompt's estimate at admission: its body's bytes / 4, as for English text
DEFAULT_COMPLETION_ESTIMATE = 256  # charged per choice when the request sets no max_tokens
MAX_IDLE_BUCKETS = 10_000  # past this many keys, buckets that refilled completely are dropped
LIMITED_METHOD, LIMITED_PREFIX = "POST", "/v1/"


@dataclass
class TokenBucket:
    """`capacity` units refilled at `capacity` per minute; taking more than are there says how long to wait."""

    capacity: float
    level: float = field(default=-1.0)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0 = now); assumes `refill` was just called."""
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


@dataclass
class RateLimiter:
    """The buckets of every API key seen, for requests (`rpm`) and tokens (`tpm`); 0 turns a limit off."""

    rpm: int
    tpm: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = field(default_factory=dict)

    def admit(self, key: str, tokens: int) -> None:
        """Take one request and `tokens` from `key`'s buckets, or raise a 429 saying when to come back (nothing is
        taken then, so a refused request costs nothing)."""
        now = self.clock()
        requests, budget = self._buckets_of(key, now)
        for bucket in (requests, budget):
            if bucket is not None:
                bucket.refill(now)
        if budget is not None and tokens > budget.capacity:
            message = f"request too large: about {tokens} tokens, over the limit of {self.tpm} tokens per minute"
            raise ApiError(429, message, code="rate_limit_exceeded", retry_after_s=60.0)
        wait = max(requests.wait_s(1) if requests else 0.0, budget.wait_s(tokens) if budget else 0.0)
        if wait > 0:
            limits = [f"{self.rpm} requests" if self.rpm else "", f"{self.tpm} tokens" if self.tpm else ""]
            message = f"rate limit reached ({' / '.join(x for x in limits if x)} per minute per API key)"
            raise ApiError(429, message, code="rate_limit_exceeded", retry_after_s=math.ceil(wait))
        if requests is not None:
            requests.level -= 1
        if budget is not None:
            budget.level -= tokens

    def settle(self, key: str, charged: int, used: int) -> None:
        """Correct `key`'s token bucket once the request's real usage is known (a bucket may go below zero)."""
        budget = self._buckets.get(key, (None, None))[1]
        if budget is not None:
            budget.level = min(budget.capacity, budget.level + charged - used)

    def _buckets_of(self, key: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        if key not in self._buckets:
            if len(self._buckets) >= MAX_IDLE_BUCKETS:
                self._drop_full(now)
            self._buckets[key] = (
                TokenBucket(self.rpm, updated=now) if self.rpm else None,
                TokenBucket(self.tpm, updated=now) if self.tpm else None,
            )
        return self._buckets[key]

    def _drop_full(self, now: float) -> None:
        for key, buckets in list(self._buckets.items()):
            for bucket in buckets:
                if bucket is not None:
                    bucket.refill(now)
            if all(b is None or b.full for b in buckets):
                del self._buckets[key]


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)


def install_rate_limits(app: web.Application, config: GatewayConfig) -> None:
    """Put a limiter on `app` when --rate-limit-rpm or --rate-limit-tpm is set."""
    if config.rate_limit_rpm or config.rate_limit_tpm:
        app[RATE_LIMITER] = RateLimiter(config.rate_limit_rpm, config.rate_limit_tpm)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit API requests within their key's limits; settle the token estimate against a JSON answer's usage."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is None or request.method != LIMITED_METHOD or not request.path.startswith(LIMITED_PREFIX):
        return await handler(request)
    key = client_key(request)
    charged = await estimate_tokens(request) if limiter.tpm else 0
    limiter.admit(key, charged)
    response = await handler(request)
    if limiter.tpm and isinstance(response, web.Response) and response.status == 200:
        used = _usage_total(response)
        if used is not None:
            limiter.settle(key, charged, used)
    return response


def client_key(request: web.Request) -> str:
    """Whose buckets a request draws on: its bearer key (hashed, so keys stay out of memory dumps), else its
    address."""
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()
    return f"ip:{request.remote}"


async def estimate_tokens(request: web.Request) -> int:
    """Prompt tokens guessed from the body's size plus the completion's limit (max_tokens x n)."""
    body = await read_body(request)
    prompt = math.ceil(len(body) / BYTES_PER_TOKEN)
    try:
        fields: Any = json.loads(body)
    except ValueError:
        return prompt  # the handler answers the bad JSON
    if not isinstance(fields, dict):
        return prompt
    if "/embeddings" in request.path:
        return prompt
    limit = fields.get("max_completion_tokens", fields.get("max_tokens", fields.get("max_output_tokens")))
    n = fields.get("n", 1)
    completion = limit if isinstance(limit, int) and limit > 0 else DEFAULT_COMPLETION_ESTIMATE
    return prompt + completion * (n if isinstance(n, int) and 0 < n <= 128 else 1)


def _usage_total(response: web.Response) -> int | None:
    """The tokens a JSON answer says it used (chat/completions' total_tokens, responses' input + output)."""
    try:
        body = json.loads(response.body) if isinstance(response.body, bytes) else None
        usage = body.get("usage") if isinstance(body, dict) else None
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    return total if isinstance(total, int) else None
