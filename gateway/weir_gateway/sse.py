"""Server-sent events as the OpenAI SDK reads them: `data: {json}` events, `data: [DONE]` last."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def dumps(payload: Any) -> str:
    """Compact JSON; NaN and infinities are refused rather than emitted as invalid JSON."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


async def open_stream(request: web.Request) -> web.StreamResponse:
    """Start an SSE response (headers go out now; errors after this are sent as events)."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, payload: Any) -> None:
    await response.write(f"data: {dumps(payload)}\n\n".encode())


async def send_done(response: web.StreamResponse) -> None:
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
