"""What the client returns: plain frozen dataclasses, so callers never touch protobuf."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict


class SamplingOptions(TypedDict, total=False):
    """Sampling keywords of `generate()`; omitted ones take the server's defaults (see weir.v1.SamplingParams)."""

    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: str | Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int
    prompt_logprobs: int
    n: int
    skip_special_tokens: bool
    include_stop_str_in_output: bool


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position."""

    token_id: int
    token: str
    logprob: float
    token_bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log probability (None for the first prompt token) and its top alternatives."""

    token_id: int
    token: str
    logprob: float | None
    token_bytes: bytes
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one choice (or of an embedding request)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class GenerationChunk:
    """New output of one choice since its previous chunk. The last chunk of a choice has `finish_reason`
    ("stop", "length", "stop_sequence", "cancelled" or "error") and `usage`; the first has `prompt_token_ids`."""

    request_id: str
    model: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Choice:
    """One whole choice of a completion."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None


@dataclass(frozen=True)
class Completion:
    """A finished generation: its choices in index order."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    choices: list[Choice]

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in input order."""

    model: str
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class Tokenization:
    """The tokens of one text; `offsets` are (start, end) character spans when asked for."""

    token_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]] | None


@dataclass(frozen=True)
class ModelInfo:
    """One model a server has loaded; `task` is "generate" or "embed"."""

    id: str
    task: str
    max_context_length: int
    vocab_size: int
    architecture: str
    dtype: str
    device: str
    is_default: bool


def collect(chunks: Iterable[GenerationChunk]) -> Completion:
    """Join a stream of chunks into a Completion."""
    return CompletionBuilder().extend(chunks).build()


class CompletionBuilder:
    """Accumulates chunks (in any interleaving of choices) into a Completion."""

    def __init__(self) -> None:
        self.request_id = ""
        self.model = ""
        self.prompt_token_ids: list[int] = []
        self._parts: dict[int, list[GenerationChunk]] = {}

    def add(self, chunk: GenerationChunk) -> None:
        self.request_id, self.model = chunk.request_id, chunk.model
        if chunk.prompt_token_ids is not None:
            self.prompt_token_ids = chunk.prompt_token_ids
        self._parts.setdefault(chunk.index, []).append(chunk)

    def extend(self, chunks: Iterable[GenerationChunk]) -> CompletionBuilder:
        for chunk in chunks:
            self.add(chunk)
        return self

    def build(self) -> Completion:
        choices = []
        for index in sorted(self._parts):
            parts = self._parts[index]
            last = parts[-1]
            choices.append(
                Choice(
                    index=index,
                    text="".join(p.text for p in parts),
                    token_ids=[t for p in parts for t in p.token_ids],
                    finish_reason=last.finish_reason,
                    stop_reason=last.stop_reason,
                    usage=last.usage,
                    logprobs=[lp for p in parts for lp in p.logprobs],
                    prompt_logprobs=next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None),
                )
            )
        return Completion(self.request_id, self.model, self.prompt_token_ids, choices)
