"""Load any OpenAI-compatible HTTP server (Weir's gateway, llama-server, vLLM) through streamed /v1/completions."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp

from weir_bench.load import RequestTiming
from weir_bench.peers import TargetError

logger = logging.getLogger(__name__)


def api_base(url: str) -> str:
    """`http://host:port`, `.../` and `.../v1` all name the same server; return it without `/v1`."""
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


class OpenAIDriver:
    """Streams completions with the prompt given as token ids (accepted by llama-server and vLLM-style servers).

    Each SSE chunk that carries text counts as one token arrival; the total comes from the final `usage` when
    the server sends it. A server that merges several tokens into one chunk therefore shows longer gaps.
    """

    def __init__(
        self,
        url: str,
        name: str = "openai",
        model: str | None = None,
        pid: int | None = None,
        temperature: float = 0.0,
        timeout_s: float = 600.0,
        api_key: str | None = None,
    ) -> None:
        self.name = name
        self.base = api_base(url)
        self.model = model
        self.pid = pid
        self.temperature = temperature
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._models: list[dict[str, Any]] | None = None
        self._llama_tokenize = False  # POST /tokenize takes llama-server's body (found on first use)

    def peak_rss_pid(self) -> int | None:
        return self.pid

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session must be made inside the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                # The load generator, not the pool, bounds concurrency. A fresh connection per request (a
                # loopback connect costs microseconds): llama-server drops kept-alive connections after a
                # stream, and reusing one fails the next request ("Can not write request body").
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
        return self._session

    async def ready(self) -> bool:
        """Whether the server answers GET /v1/models (the model list is kept for later)."""
        try:
            async with self._client().get(f"{self.base}/v1/models") as resp:
                if resp.status != 200:
                    return False
                self._models = list((await resp.json()).get("data") or [])
                return True
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.debug("%s not ready: %s", self.base, exc)
            return False

    async def _list_models(self) -> list[dict[str, Any]]:
        if self._models is None:
            try:
                async with self._client().get(f"{self.base}/v1/models") as resp:
                    resp.raise_for_status()
                    self._models = list((await resp.json()).get("data") or [])
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                logger.warning("%s: GET /v1/models failed (%s); pass --openai-model and --vocab-size", self.name, exc)
                self._models = []
        return self._models

    async def resolve_model(self) -> str:
        """The model to ask for: the one given, else the first the server lists."""
        if self.model is None:
            models = await self._list_models()
            self.model = str(models[0]["id"]) if models and "id" in models[0] else "default"
        return self.model

    async def vocab_size(self) -> int | None:
        # llama-server describes its model under `meta`; Weir's gateway may say `vocab_size`; most servers don't.
        models = await self._list_models()
        entry = next((m for m in models if m.get("id") == self.model), models[0] if models else {})
        n_vocab = entry.get("vocab_size") or (entry.get("meta") or {}).get("n_vocab")
        return int(n_vocab) if n_vocab else None

    async def tokenize(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of `texts` through POST /tokenize: vLLM's body (Weir's gateway and vLLM), or llama-server's
        (`content`, `add_special`) once a non-empty text came back with no tokens (llama-server ignores `prompt`)."""
        model = await self.resolve_model()
        out = []
        for text in texts:
            tokens = await self._tokenize_one(text, add_special_tokens, model)
            if not tokens and text and not self._llama_tokenize:
                self._llama_tokenize = True
                tokens = await self._tokenize_one(text, add_special_tokens, model)
            out.append(tokens)
        return out

    async def _tokenize_one(self, text: str, add_special_tokens: bool, model: str) -> list[int]:
        if self._llama_tokenize:
            body: dict[str, Any] = {"content": text, "add_special": add_special_tokens}
        else:
            body = {"model": model, "prompt": text, "add_special_tokens": add_special_tokens}
        try:
            async with self._client().post(f"{self.base}/tokenize", json=body) as resp:
                if resp.status != 200:
                    raise TargetError(f"{self.name}: POST /tokenize: HTTP {resp.status}: {(await resp.text())[:300]}")
                return [int(t) for t in (await resp.json())["tokens"]]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            raise TargetError(f"{self.name}: POST /tokenize failed: {exc!r}") from exc

    def _body(self, prompt: list[int], output_tokens: int) -> dict[str, Any]:
        return {
            "model": self.model or "default",
            "prompt": prompt,
            "max_tokens": output_tokens,
            "min_tokens": output_tokens,  # vLLM and Weir; llama-server relies on ignore_eos alone
            "ignore_eos": True,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def generate(self, prompt: list[int], output_tokens: int) -> RequestTiming:
        if self.model is None:
            await self.resolve_model()
        body = self._body(prompt, output_tokens)
        timing = RequestTiming.begin()
        try:
            async with self._client().post(f"{self.base}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    return timing.finish(error=f"HTTP {resp.status}: {(await resp.text())[:500]}")
                return timing.finish(*await _read_stream(resp, timing))
        except (aiohttp.ClientError, TimeoutError) as exc:
            return timing.finish(error=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_stream(resp: aiohttp.ClientResponse, timing: RequestTiming) -> tuple[int | None, str | None]:
    """Record each text chunk of an SSE completion stream; return (completion tokens per usage, error)."""
    usage_tokens: int | None = None
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            break
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            return usage_tokens, f"malformed SSE data: {data[:200]!r}"
        if "error" in chunk:
            return usage_tokens, f"stream error: {json.dumps(chunk['error'])[:500]}"
        for choice in chunk.get("choices") or ():
            if choice.get("text"):
                timing.record(1)
        if usage := chunk.get("usage"):
            usage_tokens = usage.get("completion_tokens")
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            timing.cached_tokens = int(cached) if cached is not None else None
    return usage_tokens, None
