"""What the client returns: plain frozen dataclasses, so callers never touch protobuf."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict


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
    logit_bias: Mapping[int, float] | Mapping[str, float]


class OutputOptions(TypedDict, total=False):
    """Tool and format keywords of `generate()`, in OpenAI's shapes; at most one of the five constraints
    (json_schema, json_object, regex, choice, grammar). See weir.v1.GenerateRequest."""

    tools: Sequence[Mapping[str, Any]]
    tool_choice: str | Mapping[str, Any]
    chat_template_kwargs: Mapping[str, Any]
    json_schema: Mapping[str, Any] | str
    json_object: bool
    regex: str
    choice: Sequence[str]
    grammar: str


class GenerateOptions(SamplingOptions, OutputOptions, total=False):
    """Every keyword of `generate()` and `complete()` after the input and its routing: sampling, tools, format."""


class GenerateKeywords(GenerateOptions, total=False):
    """Every keyword of `generate()` and `complete()`: the input when it is not a prompt (`messages` or `token_ids`),
    its routing and deadline (absent: the client's default; None: none), then the GenerateOptions."""

    messages: Sequence[Mapping[str, Any]] | None
    token_ids: Sequence[int] | None
    model: str
    adapter: str  # a LoRA adapter of the model, by name (the same as passing its name as `model`)
    request_id: str
    add_generation_prompt: bool  # with messages (default True)
    timeout: float | None


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
class ToolCall:
    """One complete call of a function by the model; `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str
    index: int = 0

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a dict ({} when empty); ValueError when they are not the JSON text of an object."""
        if not self.arguments.strip():
            return {}
        value = json.loads(self.arguments)
        if not isinstance(value, dict):
            raise ValueError(f"arguments of {self.name!r} are not a JSON object: {self.arguments!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape of the call, as an assistant message's `tool_calls` entry that generate() takes back."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """New output of one tool call while it streams: `id` and `name` on its first delta (None after), then
    pieces of the arguments' JSON text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


def assemble_tool_calls(deltas: Iterable[ToolCallDelta]) -> list[ToolCall]:
    """Join streamed deltas into whole calls, in index order."""
    heads: dict[int, tuple[str, str]] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        arguments.setdefault(delta.index, []).append(delta.arguments)
        head_id, head_name = heads.get(delta.index, ("", ""))
        heads[delta.index] = (head_id or delta.id or "", head_name or delta.name or "")
    return [ToolCall(*heads[i], "".join(arguments[i]), i) for i in sorted(arguments)]


@dataclass(frozen=True)
class GenerationChunk:
    """New output of one choice since its previous chunk. The last chunk of a choice has `finish_reason`
    ("stop", "length", "stop_sequence", "tool_calls", "cancelled" or "error"), `usage` and the choice's complete
    `tool_calls`; the first has `prompt_token_ids`. `reasoning_text` is new reasoning (when the server separates
    it from the answer in `text`), `tool_call_deltas` the new output of the calls being made."""

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
    reasoning_text: str = ""
    tool_call_deltas: list[ToolCallDelta] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Choice:
    """One whole choice of a completion, with its reasoning and the tools it called (when any)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None
    reasoning_text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


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

    @property
    def reasoning_text(self) -> str:
        """The first choice's reasoning."""
        return self.choices[0].reasoning_text if self.choices else ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The first choice's tool calls."""
        return self.choices[0].tool_calls if self.choices else []


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
    parent: str = ""  # a LoRA adapter's base model; empty for a model
    root: str = ""  # a LoRA adapter's folder; empty for a model


@dataclass(frozen=True)
class AdapterInfo:
    """One LoRA adapter a server has loaded: its name (pass it as `adapter`, or as `model`), folder, base model,
    rank, lora_alpha and the projections it adapts."""

    name: str
    path: str
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


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
                    reasoning_text="".join(p.reasoning_text for p in parts),
                    # The server sends whole calls on the last message; a stream cut short has only the deltas.
                    tool_calls=last.tool_calls or assemble_tool_calls(d for p in parts for d in p.tool_call_deltas),
                )
            )
        return Completion(self.request_id, self.model, self.prompt_token_ids, choices)
