"""The engine's request and output types: plain dataclasses, no protobuf, no tensors."""

from __future__ import annotations

import enum
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from weir_server.errors import InvalidRequestError

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on logit_bias
MAX_LOGIT_BIAS = 100.0  # |bias| at most this; -100 bans a token, +100 all but forces it


class FinishReason(enum.Enum):
    """Why a choice ended."""

    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context length
    STOP_SEQUENCE = "stop_sequence"  # a stop string
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens for one request; `validate()` raises InvalidRequestError naming the field."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n alternatives per generated token
    prompt_logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # OpenAI's logit_bias as distinct (token id, bias) pairs, added to the raw logits before penalties and
    # temperature; a tuple, not a dict, so the params stay hashable.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        # Temperatures this small overflow logits / T to inf; they mean "greedy" in practice.
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int | None = None, max_n: int = 16) -> None:
        """Check every field; raise InvalidRequestError for the first one out of range."""

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(f"sampling_params.{name}", message)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            check(math.isfinite(getattr(self, name)), name, "must be a finite number")
        check(self.max_tokens >= 1, "max_tokens", f"must be at least 1, got {self.max_tokens}")
        check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        check(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
        )
        check(0.0 <= self.temperature <= 2.0, "temperature", f"must be in [0, 2], got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        check(
            0.0 < self.repetition_penalty <= 2.0,
            "repetition_penalty",
            f"must be in (0, 2], got {self.repetition_penalty}",
        )
        check(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            f"must be in [-2, 2], got {self.presence_penalty}",
        )
        check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            f"must be in [-2, 2], got {self.frequency_penalty}",
        )
        check(1 <= self.n <= max_n, "n", f"must be in [1, {max_n}], got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= MAX_LOGPROBS, name, f"must be in [0, {MAX_LOGPROBS}], got {value}")
        check(all(s for s in self.stop), "stop", "stop strings must not be empty")
        check(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            check(not bad, "stop_token_ids", f"token ids out of range [0, {vocab_size}): {bad[:5]}")
        self._validate_logit_bias(vocab_size, check)

    def _validate_logit_bias(self, vocab_size: int | None, check: Callable[[bool, str, str], None]) -> None:
        """At most 300 distinct token ids, in the vocabulary where its size is known, each with a finite bias in
        [-100, 100] (OpenAI's rules); a message names the first bad token id."""
        entries = self.logit_bias
        limit = MAX_LOGIT_BIAS_ENTRIES
        check(len(entries) <= limit, "logit_bias", f"at most {limit} entries, got {len(entries)}")
        span = "must be >= 0" if vocab_size is None else f"is out of range [0, {vocab_size})"
        seen: set[int] = set()
        for token_id, bias in entries:
            in_vocab = token_id >= 0 and (vocab_size is None or token_id < vocab_size)
            check(in_vocab, "logit_bias", f"token id {token_id} {span}")
            check(token_id not in seen, "logit_bias", f"token id {token_id} appears more than once")
            seen.add(token_id)
            check(
                math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"the bias of token id {token_id} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}",
            )


# structural_tag (an xgrammar structural tag as JSON text) is built by the server for tool calls, never by clients.
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")
# Admission limits on constraints: past them xgrammar can spend minutes and gigabytes compiling one (issue 23).
MAX_CONSTRAINT_BYTES = 128 * 1024  # UTF-8 bytes of a schema, regex, grammar, tool-call tag, or all choices together
MAX_CONSTRAINT_DEPTH = 64  # nesting of JSON objects and arrays in a schema (about 32 levels of properties)
MAX_CONSTRAINT_BYTES_FLAG = "--max-constraint-bytes"
MAX_CONSTRAINT_DEPTH_FLAG = "--max-constraint-depth"
# A tool-call tag wraps each tool's schema in about eight levels of its own.
STRUCTURAL_TAG_EXTRA_DEPTH = 16
# A JSON string (escapes included) or one bracket: strings are skipped so brackets inside them do not count.
_JSON_NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


@dataclass(frozen=True)
class ConstraintLimits:
    """What one constraint may hold before it is compiled; beyond either limit it is refused."""

    max_bytes: int = MAX_CONSTRAINT_BYTES
    max_depth: int = MAX_CONSTRAINT_DEPTH


def json_depth(text: str) -> int:
    """How deeply objects and arrays nest in JSON text (0 for a scalar), counted without parsing it, so that
    text too deep for a recursive parser is measured, not parsed."""
    steps = (1 if token in "[{" else -1 for token in _JSON_NESTING.findall(text) if len(token) == 1)
    return max(itertools.accumulate(steps, initial=0))


@dataclass(frozen=True)
class Constraint:
    """A format the output must follow: a JSON schema (text), any JSON object, a regex, one of `choice`'s strings
    (a tuple), or an EBNF grammar. `kind` is also the field named when it is invalid."""

    kind: str
    value: str | tuple[str, ...] = ""

    def validate(self, limits: ConstraintLimits = ConstraintLimits()) -> None:
        """Check the shape and size (the engine compiles it to check the content); raise InvalidRequestError naming
        the kind and the limit."""
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidRequestError("constraint", f"must be one of {', '.join(CONSTRAINT_KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not isinstance(self.value, tuple) or not self.value:
                raise InvalidRequestError("choice", "must hold at least one string")
        elif self.kind != "json_object" and (not isinstance(self.value, str) or not self.value):
            raise InvalidRequestError(self.kind, "must not be empty")
        self._check_size(limits)

    def _check_size(self, limits: ConstraintLimits) -> None:
        texts = self.value if isinstance(self.value, tuple) else (self.value,)
        # Characters first (a character is 1-4 bytes): a 20 MB value is refused without encoding it.
        size, unit = sum(map(len, texts)), "characters"
        if size <= 4 * limits.max_bytes:
            size, unit = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts), "bytes"
        if size > limits.max_bytes:
            whose = "the choices together have" if self.kind == "choice" else "has"
            allowed = f"{limits.max_bytes} bytes ({MAX_CONSTRAINT_BYTES_FLAG})"
            raise InvalidRequestError(self.kind, f"{whose} {size} {unit}; the limit is {allowed}")
        if self.kind in ("json_schema", "structural_tag"):
            assert isinstance(self.value, str)
            depth, limit = json_depth(self.value), limits.max_depth
            flag = MAX_CONSTRAINT_DEPTH_FLAG
            if self.kind == "structural_tag":  # built by the server around the tools' schemas
                limit += STRUCTURAL_TAG_EXTRA_DEPTH
                flag += f", and {STRUCTURAL_TAG_EXTRA_DEPTH} for the tool-call tag around the schemas"
            if depth > limit:
                message = f"nests objects and arrays {depth} deep; the limit is {limit} ({flag})"
                raise InvalidRequestError(self.kind, message)


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it: a tokenized prompt, its sampling parameters and an output constraint."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    constraint: Constraint | None = None
    adapter: str | None = None  # the LoRA adapter to run with (a loaded adapter's name); None = the base model


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded LoRA adapter, as ListAdapters and /v1/models describe it."""

    name: str
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # PEFT names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    base_model_id: str  # the served base model it runs over


@dataclass(frozen=True)
class TopLogprob:
    """One candidate at a position."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log probability at a position and the top alternatives (best first)."""

    token_id: int
    logprob: float | None  # None for the first prompt token
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one choice."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class RequestTiming:
    """Engine timestamps of one choice (time.time()), for queue/prefill/decode spans and latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None


@dataclass(slots=True)
class GenerationOutput:
    """New output of one choice since its previous output. Several tokens may arrive at once.

    Not frozen: hundreds are made per engine step, and the server process fills in `text` for the choices whose
    engine core sends token ids only; nothing changes an output once it has been handed to its stream.
    """

    request_id: str
    index: int  # choice index, 0..n-1
    text: str  # new text (never broken UTF-8, never part of a stop string)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output of each choice, when asked
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None  # the matched stop string
    usage: Usage | None = None  # on the last output of each choice
    error: str | None = None  # set with finish_reason ERROR
    timing: RequestTiming | None = None  # on the last output of each choice

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
