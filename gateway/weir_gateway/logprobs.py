"""Token log probabilities in the two OpenAI shapes: completions (parallel lists) and chat (content entries)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from weir.v1 import inference_pb2 as pb

FLOOR = -9999.0  # what -inf becomes, as in vLLM: JSON has no infinities


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def _bytes(token: pb.TokenLogprob | pb.TopLogprob) -> list[int]:
    return list(token.token_bytes or token.token.encode())


class CompletionLogprobs:
    """One choice's completions-shape logprobs: tokens, token_logprobs, top_logprobs dicts, text_offset."""

    def __init__(self) -> None:
        self.offset = 0  # character offset of the next token in the choice's text
        self.total = self._empty()

    @staticmethod
    def _empty() -> dict[str, list[Any]]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, items: Iterable[pb.TokenLogprob]) -> dict[str, list[Any]]:
        """Append tokens; return the part for just these tokens (a stream chunk's `logprobs`)."""
        part = self._empty()
        for item in items:
            logprob = _finite(item.logprob) if item.HasField("logprob") else None
            part["tokens"].append(item.token)
            part["token_logprobs"].append(logprob)
            if logprob is None:  # the first prompt token has no distribution
                part["top_logprobs"].append(None)
            else:
                top = {item.token: logprob}
                top.update((t.token, _finite(t.logprob)) for t in item.top_logprobs)
                part["top_logprobs"].append(top)
            part["text_offset"].append(self.offset)
            self.offset += len(item.token)
        for key, values in part.items():
            self.total[key].extend(values)
        return part

    def skip_text(self, text: str) -> None:
        """Account for text that has no logprobs (an echoed prompt sent without prompt logprobs)."""
        self.offset += len(text)


def chat_logprob_entries(items: Iterable[pb.TokenLogprob]) -> list[dict[str, Any]]:
    """Chat-shape entries: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
    return [
        {
            "token": item.token,
            "logprob": _finite(item.logprob),
            "bytes": _bytes(item),
            "top_logprobs": [
                {"token": t.token, "logprob": _finite(t.logprob), "bytes": _bytes(t)} for t in item.top_logprobs
            ],
        }
        for item in items
    ]
